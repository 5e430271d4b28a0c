"""push-sender's own tables: the delivery ledger (one row per notification_id).

The ledger's columns and its claim protocol are `herald_shared.ledger`'s; push-sender adds the
device the push went to and its own failure codes. The device token is never stored here.
"""

from __future__ import annotations

from enum import StrEnum

from sqlalchemy import Column, MetaData, Uuid

from herald_shared.ledger import delivery_ledger_table

metadata = MetaData()


class Failure(StrEnum):
    """Why a failed push failed (the ledger's `failure`)."""

    # The device's token is dead: the device was invalidated.
    TOKEN_INVALID = "token_invalid"  # noqa: S105 - a label, not a secret
    REJECTED = "rejected"  # the provider refused this push for good: dead-lettered


push_deliveries = delivery_ledger_table(
    "push_deliveries",
    metadata,
    Column("device_id", Uuid, nullable=False),
    failures=Failure,
)
