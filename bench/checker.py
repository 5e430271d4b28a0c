"""The benchmark's checker: from what the API accepted, what the router's ledger holds and what the
local providers accepted, which notifications completed, when, and which are lost, not drained or
duplicated.

A notification is one recipient of one message. It is **complete** when the router's ledger has
its row and every delivery it is owed was accepted by a provider: the push to the recipient's one
device, and the e-mail if the recipient has e-mail enabled. One that is not complete is either:

* **lost**: it will never arrive. Proven two ways: the pipeline had **settled** when the drain
  ended (no delivery for a while, no message in any queue of the run's vhost, ready or
  unacknowledged, dead-letter queues aside, and no unpublished outbox row: nothing is on its way),
  or the router's ledger has its missing delivery as `failed` (the sender gave up on it);
* **not drained**: still on its way when the drain ended (the drain bound or a stall was reached
  while the pipeline still held work). A backlog, not a loss.

The checker is incremental (`Tally`): posted messages, provider records and ledger rows are fed in
as they arrive, into fixed-size arrays per notification, so that a 30,000-message run costs the
harness the same per notification as a 600-message one and keeps no record objects around. Pure
functions and plain data, no I/O but the record-file reader.
"""

from __future__ import annotations

import uuid
from array import array
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
    # Per completed notification, when it completed (the later of its push and e-mail).
    completed_at: array[float] = field(default_factory=lambda: array("d"))
    # Per delivery accepted (first acceptance only): when, and the latency (s) from the HTTP 201.
    push_accepted_at: array[float] = field(default_factory=lambda: array("d"))
    push_latency: array[float] = field(default_factory=lambda: array("d"))
    email_accepted_at: array[float] = field(default_factory=lambda: array("d"))
    email_latency: array[float] = field(default_factory=lambda: array("d"))
    settled: bool = False  # the pipeline held nothing when the drain ended
    lost: int = 0
    not_drained: int = 0
    lost_by_part: Counter[str] = field(default_factory=Counter)  # ledger / push / email
    not_drained_by_part: Counter[str] = field(default_factory=Counter)
    duplicates_by_kind: Counter[str] = field(default_factory=Counter)
    unexpected: int = 0  # deliveries nobody was owed (e.g. a push to the sender)
    lost_message_ids: list[str] = field(default_factory=list)  # a few, for investigation
    not_drained_message_ids: list[str] = field(default_factory=list)

    @property
    def duplicates(self) -> int:
        return sum(self.duplicates_by_kind.values())

    @property
    def completed(self) -> int:
        return len(self.completed_at)


def classify(missing: bool, *, settled: bool, failed: bool) -> str:
    """ "complete", "lost" or "not drained" for one notification: missing parts are lost when
    nothing can bring them any more (the pipeline settled, or the ledger says a sender gave up)."""
    if not missing:
        return "complete"
    return "lost" if settled or failed else "not drained"


class Tally:
    """Notifications of the posted messages, as compact arrays indexed by slot: the n-th message
    registered owns slots n*width to n*width + width - 1, one per seat of its room."""

    def __init__(
        self,
        population: Population,
        *,
        email_notification_id: Callable[[uuid.UUID, uuid.UUID], uuid.UUID],
    ) -> None:
        self.population = population
        self.email_notification_id = email_notification_id
        self.width = max(len(room.members) for room in population.rooms)
        # user index → (room, seat); device token and user id → user index
        self._seat: dict[int, tuple[int, int]] = {
            member: (number, seat)
            for number, room in enumerate(population.rooms)
            for seat, member in enumerate(room.members)
        }
        self._by_token = {user.device_token: user.index for user in population.users}
        self._by_user_id = {user.id: user.index for user in population.users}
        # per message: its slot base, room, sender seat, 201 time
        self.messages: list[Posted] = []
        self._message_number: dict[str, int] = {}
        self._email_slot: dict[str, int] = {}  # e-mail notification id → slot
        # per slot
        self._push_at = array("d")
        self._push_n = array("I")
        self._email_at = array("d")
        self._email_n = array("I")
        self._ledger_n = array("I")
        self._failed = bytearray()  # bit 1: push reported failed, bit 2: e-mail
        # records that arrived before the 201 of their message was seen
        self._early_pushes: dict[str, list[PushRecord]] = {}
        self._early_emails: dict[str, list[EmailRecord]] = {}
        self.unexpected = 0
        self.ledger_read = False
        self.owed_pushes = 0
        self.owed_emails = 0
        self.pushes_accepted = 0  # distinct owed pushes accepted so far
        self.emails_accepted = 0
        self.push_records = 0  # every push record of an owed push, repeats included
        self.email_records = 0
        self.last_push_at = 0.0  # of any push record, repeats included
        self.last_email_at = 0.0

    # --- feeding ----------------------------------------------------------------------------

    def register(self, message: Posted) -> None:
        number = len(self.messages)
        self.messages.append(message)
        key = str(message.message_id)
        self._message_number[key] = number
        for slots in (self._push_at, self._email_at):
            slots.extend(0.0 for _ in range(self.width))
        for counts in (self._push_n, self._email_n, self._ledger_n):
            counts.extend(0 for _ in range(self.width))
        self._failed.extend(bytes(self.width))
        room = self.population.rooms[message.room]
        base = number * self.width
        for seat, member in enumerate(room.members):
            if member == message.sender:
                continue
            self.owed_pushes += 1
            user = self.population.users[member]
            if user.email_enabled:
                self.owed_emails += 1
                email_id = str(self.email_notification_id(message.message_id, user.id))
                self._email_slot[email_id] = base + seat
                for record in self._early_emails.pop(email_id, ()):
                    self.email(record)
        for push in self._early_pushes.pop(key, ()):
            self.push(push)

    def push(self, record: PushRecord) -> None:
        number = self._message_number.get(record.message_id)
        if number is None:
            self._early_pushes.setdefault(record.message_id, []).append(record)
            return
        slot = self._slot(number, self._by_token.get(record.device_token))
        if slot is None:
            self.unexpected += 1
            return
        self.push_records += 1
        self.last_push_at = max(self.last_push_at, record.accepted_at)
        if self._push_n[slot] == 0:
            self._push_at[slot] = record.accepted_at
            self.pushes_accepted += 1
        else:
            self._push_at[slot] = min(self._push_at[slot], record.accepted_at)
        self._push_n[slot] += 1

    def email(self, record: EmailRecord) -> None:
        notification_id = record.notification_id
        slot = self._email_slot.get(notification_id)
        if slot is None:
            self._early_emails.setdefault(notification_id, []).append(record)
            return
        self.email_records += 1
        self.last_email_at = max(self.last_email_at, record.accepted_at)
        if self._email_n[slot] == 0:
            self._email_at[slot] = record.accepted_at
            self.emails_accepted += 1
        else:
            self._email_at[slot] = min(self._email_at[slot], record.accepted_at)
        self._email_n[slot] += 1

    def ledger_row(self, message_id: uuid.UUID, recipient_id: uuid.UUID) -> None:
        """One row of the router's ledger (rows of messages not posted here are ignored)."""
        self.ledger_read = True
        number = self._message_number.get(str(message_id))
        if number is not None:
            slot = self._slot(number, self._by_user_id.get(recipient_id))
            if slot is not None:
                self._ledger_n[slot] += 1

    def delivery_failed(self, message_id: uuid.UUID, recipient_id: uuid.UUID, channel: str) -> None:
        """The router's ledger has this delivery `failed`: it will not come."""
        number = self._message_number.get(str(message_id))
        if number is not None:
            slot = self._slot(number, self._by_user_id.get(recipient_id))
            if slot is not None:
                self._failed[slot] |= 1 if channel == "push" else 2

    def _slot(self, number: int, user: int | None) -> int | None:
        """The slot of `user` in message `number`, or None if that user is owed nothing by it."""
        if user is None:
            return None
        message = self.messages[number]
        room, seat = self._seat[user]
        if room != message.room or user == message.sender:
            return None
        return number * self.width + seat

    def push_latencies(self, room: int) -> list[float]:
        """Seconds from each 201 of a message in `room` to its pushes' first acceptance (the
        pushes accepted so far)."""
        latencies = []
        for number, message in enumerate(self.messages):
            if message.room != room:
                continue
            for seat, member in enumerate(self.population.rooms[room].members):
                slot = number * self.width + seat
                if member != message.sender and self._push_n[slot]:
                    latencies.append(self._push_at[slot] - message.accepted_at)
        return latencies

    def pushes_pending_at(self, moment: float, room: int) -> int:
        """Pushes of messages in `room` posted by `moment` and not accepted by then."""
        pending = 0
        for number, message in enumerate(self.messages):
            if message.room != room or message.accepted_at > moment:
                continue
            for seat, member in enumerate(self.population.rooms[room].members):
                slot = number * self.width + seat
                if member != message.sender and (
                    not self._push_n[slot] or self._push_at[slot] > moment
                ):
                    pending += 1
        return pending

    @property
    def all_delivered(self) -> bool:
        return self.pushes_accepted >= self.owed_pushes and self.emails_accepted >= self.owed_emails

    # --- result -----------------------------------------------------------------------------

    def result(self, *, settled: bool) -> CheckResult:
        """Classify every owed notification. `settled`: the pipeline held nothing any more when
        the drain ended, so whatever is missing now is lost rather than not drained."""
        result = CheckResult(settled=settled)
        users = self.population.users
        for number, message in enumerate(self.messages):
            base = number * self.width
            message_id = str(message.message_id)
            outcome_of_message = "complete"
            for seat, member in enumerate(self.population.rooms[message.room].members):
                if member == message.sender:
                    continue
                slot = base + seat
                result.notifications_expected += 1
                missing: list[str] = []
                if self.ledger_read and self._ledger_n[slot] == 0:
                    missing.append("ledger")
                done_at = 0.0
                if self._push_n[slot]:
                    done_at = self._push_at[slot]
                    result.push_accepted_at.append(done_at)
                    result.push_latency.append(done_at - message.accepted_at)
                else:
                    missing.append("push")
                if users[member].email_enabled:
                    if self._email_n[slot]:
                        email_at = self._email_at[slot]
                        result.email_accepted_at.append(email_at)
                        result.email_latency.append(email_at - message.accepted_at)
                        done_at = max(done_at, email_at)
                    else:
                        missing.append("email")
                failed = bool(self._failed[slot]) and (
                    ("push" in missing and self._failed[slot] & 1)
                    or ("email" in missing and self._failed[slot] & 2)
                )
                outcome = classify(bool(missing), settled=settled, failed=bool(failed))
                if outcome == "complete":
                    result.completed_at.append(done_at)
                elif outcome == "lost":
                    result.lost += 1
                    result.lost_by_part.update(missing)
                    outcome_of_message = "lost"
                else:
                    result.not_drained += 1
                    result.not_drained_by_part.update(missing)
                    if outcome_of_message == "complete":
                        outcome_of_message = "not drained"
            if outcome_of_message == "lost" and len(result.lost_message_ids) < 10:
                result.lost_message_ids.append(message_id)
            elif outcome_of_message == "not drained" and len(result.not_drained_message_ids) < 10:
                result.not_drained_message_ids.append(message_id)
        result.duplicates_by_kind["ledger_rows"] = _repeats(self._ledger_n)
        result.duplicates_by_kind["push_deliveries"] = _repeats(self._push_n)
        result.duplicates_by_kind["email_deliveries"] = _repeats(self._email_n)
        result.unexpected = (
            self.unexpected
            + sum(len(records) for records in self._early_pushes.values())
            + sum(len(records) for records in self._early_emails.values())
        )
        return result


def _repeats(counts: Iterable[int]) -> int:
    return sum(n - 1 for n in counts if n > 1)
