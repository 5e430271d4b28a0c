"""The chat scenario's check: every delivery the router decided accepted once, none else."""

from __future__ import annotations

from bench.chat import check
from bench.checker import EmailRecord, PushRecord


def push(notification_id: str) -> PushRecord:
    return PushRecord(1.0, notification_id, "message", "token")


def email(notification_id: str) -> EmailRecord:
    return EmailRecord(1.0, f"<{notification_id}@herald.test>", ("bob@example.test",))


def test_each_decided_delivery_accepted_once_is_clean() -> None:
    ledger = {"deliveries": {"p1": ("push", "delivered"), "e1": ("email", "delivered")}}

    assert check(ledger, [push("p1")], [email("e1")]) == {
        "deliveries_decided": 2,
        "accepted": 2,
        "lost": 0,
        "duplicates": 0,
        "unexpected": 0,
        "not_delivered_in_ledger": 0,
    }


def test_lost_repeated_unexpected_and_undelivered_are_counted() -> None:
    ledger = {
        "deliveries": {
            "p1": ("push", "delivered"),
            "p2": ("push", "pending"),
            "e1": ("email", "delivered"),
        }
    }

    checked = check(ledger, [push("p1"), push("p1"), push("stray")], [])

    assert checked["lost"] == 2  # p2 and e1
    assert checked["duplicates"] == 1
    assert checked["unexpected"] == 1
    assert checked["not_delivered_in_ledger"] == 1
