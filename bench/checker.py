"""The benchmark's checker: from what the API accepted, what the router's ledger holds and what the
local providers accepted, which notifications completed, when, and which were lost or duplicated.

A notification is one recipient of one message. It is complete when the router's ledger has its
row and every delivery it is owed was accepted by a provider: the push to the recipient's one
device, and the e-mail if the recipient has e-mail enabled. Pure functions, no I/O.
"""

from __future__ import annotations

import uuid
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

from bench.load import Population, Posted


@dataclass(frozen=True)
class PushRecord:
    accepted_at: float
    notification_id: str
    message_id: str
    device_token: str


@dataclass(frozen=True)
class EmailRecord:
    accepted_at: float
    message_id_header: str  # <notification_id@domain>
    recipients: tuple[str, ...]

    @property
    def notification_id(self) -> str:
        return self.message_id_header.strip("<>").split("@", 1)[0]


def read_push_records(path: Path, offset: int = 0) -> tuple[list[PushRecord], int]:
    """Complete lines from `offset` on, and the offset after the last complete line."""
    lines, offset = _read_lines(path, offset)
    records = []
    for line in lines:
        accepted_at, notification_id, message_id, token = line.split("\t")
        records.append(PushRecord(float(accepted_at), notification_id, message_id, token))
    return records, offset


def read_email_records(path: Path, offset: int = 0) -> tuple[list[EmailRecord], int]:
    lines, offset = _read_lines(path, offset)
    records = []
    for line in lines:
        accepted_at, message_id, recipients = line.split("\t")
        records.append(EmailRecord(float(accepted_at), message_id, tuple(recipients.split(","))))
    return records, offset


def _read_lines(path: Path, offset: int) -> tuple[list[str], int]:
    if not path.exists():
        return [], offset
    with path.open("rb") as file:
        file.seek(offset)
        data = file.read()
    end = data.rfind(b"\n") + 1  # a line still being written stays for next time
    return data[:end].decode().splitlines(), offset + end


@dataclass
class CheckResult:
    notifications_expected: int = 0
    # Per completed notification: when it completed, and the latencies (s) from the HTTP 201.
    completed_at: list[float] = field(default_factory=list)
    push_latency: list[tuple[float, float]] = field(default_factory=list)  # (accepted at, s)
    email_latency: list[tuple[float, float]] = field(default_factory=list)
    lost: int = 0
    lost_by_part: Counter[str] = field(default_factory=Counter)  # ledger / push / email
    duplicates_by_kind: Counter[str] = field(default_factory=Counter)
    unexpected: int = 0  # deliveries nobody was owed (e.g. a push to the sender)
    lost_message_ids: list[str] = field(default_factory=list)  # a few, for investigation

    @property
    def duplicates(self) -> int:
        return sum(self.duplicates_by_kind.values())

    @property
    def completed(self) -> int:
        return len(self.completed_at)


def check(
    *,
    population: Population,
    posted: Iterable[Posted],
    pushes: Iterable[PushRecord],
    emails: Iterable[EmailRecord],
    ledger_keys: Iterable[tuple[uuid.UUID, uuid.UUID]],
    email_notification_id: Callable[[uuid.UUID, uuid.UUID], uuid.UUID],
) -> CheckResult:
    """`ledger_keys`: (message_id, recipient_id) of every row of the router's ledger.
    `email_notification_id(message_id, recipient_id)`: the e-mail's idempotency key, which the
    sender puts in the Message-ID."""
    result = CheckResult()

    ledger = Counter(ledger_keys)
    result.duplicates_by_kind["ledger_rows"] = sum(n - 1 for n in ledger.values() if n > 1)

    first_push: dict[tuple[str, str], float] = {}
    push_ids: Counter[str] = Counter()
    for push in pushes:
        key = (push.message_id, push.device_token)
        push_ids[push.notification_id or f"{key}"] += 1
        first_push[key] = min(push.accepted_at, first_push.get(key, push.accepted_at))
    result.duplicates_by_kind["push_deliveries"] = sum(n - 1 for n in push_ids.values() if n > 1)

    first_email: dict[str, float] = {}
    email_ids: Counter[str] = Counter()
    for mail in emails:
        email_ids[mail.notification_id] += 1
        first_email[mail.notification_id] = min(
            mail.accepted_at, first_email.get(mail.notification_id, mail.accepted_at)
        )
    result.duplicates_by_kind["email_deliveries"] = sum(n - 1 for n in email_ids.values() if n > 1)

    owed_pushes: set[tuple[str, str]] = set()
    owed_emails: set[str] = set()
    for message in posted:
        room = population.rooms[message.room]
        message_id = str(message.message_id)
        message_lost = False
        for member in room.members:
            if member == message.sender:
                continue
            user = population.users[member]
            result.notifications_expected += 1
            missing: list[str] = []
            if ledger[(message.message_id, user.id)] == 0:
                missing.append("ledger")
            push_key = (message_id, user.device_token)
            owed_pushes.add(push_key)
            push_at = first_push.get(push_key)
            if push_at is None:
                missing.append("push")
            else:
                result.push_latency.append((push_at, push_at - message.accepted_at))
            done_at = push_at or 0.0
            if user.email_enabled:
                email_id = str(email_notification_id(message.message_id, user.id))
                owed_emails.add(email_id)
                email_at = first_email.get(email_id)
                if email_at is None:
                    missing.append("email")
                else:
                    result.email_latency.append((email_at, email_at - message.accepted_at))
                    done_at = max(done_at, email_at)
            if missing:
                result.lost += 1
                result.lost_by_part.update(missing)
                message_lost = True
            else:
                result.completed_at.append(done_at)
        if message_lost and len(result.lost_message_ids) < 10:
            result.lost_message_ids.append(message_id)

    result.unexpected = sum(1 for key in first_push if key not in owed_pushes) + sum(
        1 for key in first_email if key not in owed_emails
    )
    return result
