"""email-sender's own tables: the delivery ledger (one row per notification_id).

The ledger's columns and its claim protocol are `herald_shared.ledger`'s; email-sender adds its
own failure codes. `provider` holds the backend's name (smtp, file).
"""

from __future__ import annotations

from enum import StrEnum

from sqlalchemy import MetaData

from herald_shared.ledger import delivery_ledger_table

metadata = MetaData()


class Failure(StrEnum):
    """Why a failed e-mail failed (the ledger's `failure`)."""

    BOUNCED = "bounced"  # the recipient's address refused for good (SMTP 5xx to RCPT TO)
    REJECTED = "rejected"  # this e-mail refused for good, not its address (SMTP 5xx to DATA)
    INVALID = "invalid"  # the job cannot become an e-mail


email_deliveries = delivery_ledger_table("email_deliveries", metadata, failures=Failure)
