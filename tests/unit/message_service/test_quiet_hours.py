"""Quiet hours, Do Not Disturb (snooze) and breakthrough users: what the user sets, what the API
shows and what each `user.updated` snapshot carries."""

from __future__ import annotations

import re
import uuid
import zoneinfo
from datetime import datetime, timedelta
from typing import Any

import httpx
import pytest

from herald_shared.events import QuietHoursSnapshot, utc_now
from message_service.app import MessageService
from message_service.models import Preferences
from tests.unit.message_service.helpers import register, user_updates

NIGHT = {"start": "22:00", "end": "07:00", "time_zone": "Europe/Paris"}


async def put_preferences(
    client: httpx.AsyncClient, headers: dict[str, str], body: dict[str, Any]
) -> httpx.Response:
    return await client.put("/users/me/preferences", json=body, headers=headers)


async def snooze(
    client: httpx.AsyncClient, headers: dict[str, str], until: datetime | str | None
) -> httpx.Response:
    sent = until.isoformat() if isinstance(until, datetime) else until
    return await client.put("/users/me/snooze", json={"until": sent}, headers=headers)


def instant(text: str | None) -> datetime | None:
    return None if text is None else datetime.fromisoformat(text)


async def test_quiet_hours_are_set_shown_and_published(
    client: httpx.AsyncClient, runtime: MessageService
) -> None:
    alice = await register(client, "alice")

    response = await put_preferences(client, alice.headers, {"quiet_hours": NIGHT})

    assert response.status_code == 200
    assert response.json()["quiet_hours"] == NIGHT
    read = (await client.get("/users/me/preferences", headers=alice.headers)).json()
    assert read["quiet_hours"] == NIGHT
    updates = await user_updates(runtime, alice.id)
    assert [u.preferences.quiet_hours for u in updates] == [None, QuietHoursSnapshot(**NIGHT)]


async def test_quiet_hours_left_out_are_kept_and_null_removes_them(
    client: httpx.AsyncClient, runtime: MessageService
) -> None:
    alice = await register(client, "alice")
    await put_preferences(client, alice.headers, {"quiet_hours": NIGHT})

    other_change = await put_preferences(client, alice.headers, {"push": "all"})
    removed = await put_preferences(client, alice.headers, {"quiet_hours": None})

    assert other_change.json()["quiet_hours"] == NIGHT
    assert removed.status_code == 200
    assert removed.json()["quiet_hours"] is None
    updates = await user_updates(runtime, alice.id)
    assert [u.version for u in updates] == [1, 2, 3, 4]
    night = QuietHoursSnapshot(**NIGHT)
    assert [u.preferences.quiet_hours for u in updates] == [None, night, night, None]


async def test_quiet_hours_may_end_the_next_day_or_the_same(client: httpx.AsyncClient) -> None:
    alice = await register(client, "alice")
    lunch = {"start": "12:00", "end": "13:30", "time_zone": "UTC"}

    for hours in (NIGHT, lunch, {**NIGHT, "time_zone": "America/Argentina/Buenos_Aires"}):
        response = await put_preferences(client, alice.headers, {"quiet_hours": hours})
        assert response.status_code == 200, response.text
        assert response.json()["quiet_hours"] == hours


@pytest.mark.parametrize(
    ("hours", "reason"),
    [
        ({**NIGHT, "time_zone": "Mars/Olympus_Mons"}, "unknown time zone"),
        ({**NIGHT, "time_zone": "europe/paris"}, "unknown time zone"),
        ({**NIGHT, "time_zone": "localtime"}, "unknown time zone"),  # the host's own zone
        ({**NIGHT, "end": "22:00"}, "quiet hours must not be empty"),
        ({**NIGHT, "start": "25:00"}, None),
        ({**NIGHT, "start": "7:00"}, None),
        ({**NIGHT, "end": "24:00"}, None),
        ({**NIGHT, "time_zone": ""}, None),
        ({**NIGHT, "time_zone": "Europe/Paris "}, None),
        ({**NIGHT, "time_zone": "../etc/passwd"}, None),
        ({**NIGHT, "time_zone": "A" * 65}, None),
        ({"start": "22:00", "end": "07:00"}, None),
        ({**NIGHT, "days": ["mon"]}, None),
        ("22:00-07:00", None),
    ],
)
async def test_invalid_quiet_hours_are_422(
    client: httpx.AsyncClient, runtime: MessageService, hours: Any, reason: str | None
) -> None:
    alice = await register(client, "alice")

    response = await put_preferences(client, alice.headers, {"quiet_hours": hours})

    assert response.status_code == 422
    if reason is not None:
        assert reason in response.json()["detail"]
    assert [u.version for u in await user_updates(runtime, alice.id)] == [1]


async def test_breakthrough_users_are_replaced_shown_and_published(
    client: httpx.AsyncClient, runtime: MessageService
) -> None:
    alice = await register(client, "alice")
    bob = await register(client, "bob")
    carol = await register(client, "carol")
    both = sorted([bob.id, carol.id])

    first = await put_preferences(
        client,
        alice.headers,
        {"breakthrough_user_ids": [str(carol.id), str(bob.id), str(carol.id)]},
    )
    replaced = await put_preferences(
        client, alice.headers, {"breakthrough_user_ids": [str(carol.id)]}
    )
    kept = await put_preferences(client, alice.headers, {"push_preview": False})
    cleared = await put_preferences(client, alice.headers, {"breakthrough_user_ids": []})

    assert first.status_code == 200
    assert first.json()["breakthrough_user_ids"] == [str(user) for user in both]
    assert replaced.json()["breakthrough_user_ids"] == [str(carol.id)]
    assert kept.json()["breakthrough_user_ids"] == [str(carol.id)]
    assert cleared.json()["breakthrough_user_ids"] == []
    read = (await client.get("/users/me/preferences", headers=alice.headers)).json()
    assert read["breakthrough_user_ids"] == []
    updates = await user_updates(runtime, alice.id)
    assert [u.preferences.breakthrough_user_ids for u in updates] == [
        [],
        both,
        [carol.id],
        [carol.id],
        [],
    ]
    # Only Alice's preferences changed: Bob's and Carol's snapshots are their first.
    assert [u.version for u in await user_updates(runtime, bob.id)] == [1]


async def test_breakthrough_users_must_be_others_that_exist(
    client: httpx.AsyncClient, runtime: MessageService
) -> None:
    alice = await register(client, "alice")
    bob = await register(client, "bob")
    stranger = uuid.uuid4()

    unknown = await put_preferences(
        client, alice.headers, {"breakthrough_user_ids": [str(bob.id), str(stranger)]}
    )
    yourself = await put_preferences(
        client, alice.headers, {"breakthrough_user_ids": [str(alice.id)]}
    )
    null = await put_preferences(client, alice.headers, {"breakthrough_user_ids": None})
    too_many = await put_preferences(
        client, alice.headers, {"breakthrough_user_ids": [str(uuid.uuid4()) for _ in range(101)]}
    )

    assert unknown.status_code == yourself.status_code == 422
    assert null.status_code == too_many.status_code == 422
    assert str(stranger) in unknown.json()["detail"]
    assert str(bob.id) not in unknown.json()["detail"]
    assert "your own breakthrough user" in yourself.json()["detail"]
    read = (await client.get("/users/me/preferences", headers=alice.headers)).json()
    assert read["breakthrough_user_ids"] == []
    assert [u.version for u in await user_updates(runtime, alice.id)] == [1]


async def test_an_identical_put_publishes_nothing(
    client: httpx.AsyncClient, runtime: MessageService
) -> None:
    alice = await register(client, "alice")
    bob = await register(client, "bob")
    body = {"quiet_hours": NIGHT, "breakthrough_user_ids": [str(bob.id)]}

    first = await put_preferences(client, alice.headers, body)
    again = await put_preferences(client, alice.headers, body)

    assert first.status_code == again.status_code == 200
    assert again.json() == first.json()
    updates = await user_updates(runtime, alice.id)
    assert [u.version for u in updates] == [1, 2]
    assert updates[-1].preferences.quiet_hours == QuietHoursSnapshot(**NIGHT)
    assert updates[-1].preferences.breakthrough_user_ids == [bob.id]


async def test_snooze_is_set_cleared_and_published(
    client: httpx.AsyncClient, runtime: MessageService
) -> None:
    alice = await register(client, "alice")
    until = (utc_now() + timedelta(hours=2)).replace(microsecond=0)

    snoozed = await snooze(client, alice.headers, until)
    same_again = await snooze(client, alice.headers, until.isoformat().replace("+00:00", "Z"))
    read = (await client.get("/users/me/preferences", headers=alice.headers)).json()
    ended = await snooze(client, alice.headers, None)
    ended_again = await snooze(client, alice.headers, None)

    assert snoozed.status_code == same_again.status_code == 200
    assert instant(snoozed.json()["snoozed_until"]) == until
    assert instant(read["snoozed_until"]) == until
    assert read["push"] == "mentions"  # the answer is the whole preferences
    assert ended.status_code == ended_again.status_code == 200
    assert ended.json()["snoozed_until"] is None
    updates = await user_updates(runtime, alice.id)
    assert [u.version for u in updates] == [1, 2, 3]  # the repeated ones changed nothing
    assert [u.preferences.snoozed_until for u in updates] == [None, until, None]


async def test_a_snooze_in_another_offset_is_the_same_instant(client: httpx.AsyncClient) -> None:
    alice = await register(client, "alice")
    until = (utc_now() + timedelta(days=1)).replace(microsecond=0)
    in_new_york = until.astimezone(zoneinfo.ZoneInfo("America/New_York"))

    response = await snooze(client, alice.headers, in_new_york)

    assert response.status_code == 200
    assert instant(response.json()["snoozed_until"]) == until
    assert response.json()["snoozed_until"].endswith("Z")


async def test_a_snooze_in_the_past_ends_it(
    client: httpx.AsyncClient, runtime: MessageService
) -> None:
    alice = await register(client, "alice")
    await snooze(client, alice.headers, utc_now() + timedelta(hours=1))

    response = await snooze(client, alice.headers, "2020-01-01T00:00:00Z")
    long_ago = await snooze(client, alice.headers, "0001-01-01T00:00:00+01:00")

    assert response.status_code == long_ago.status_code == 200
    assert response.json()["snoozed_until"] is None
    updates = await user_updates(runtime, alice.id)
    assert [u.preferences.snoozed_until is None for u in updates] == [True, False, True]


async def test_a_snooze_that_ended_shows_as_none(
    client: httpx.AsyncClient, runtime: MessageService
) -> None:
    """Nothing clears a snooze when it ends: it reads as none (and is published as none)."""
    alice = await register(client, "alice")
    async with runtime.sessions() as session:
        preferences = await session.get(Preferences, alice.id)
        assert preferences is not None
        preferences.snoozed_until = utc_now() - timedelta(seconds=1)
        await session.commit()

    read = (await client.get("/users/me/preferences", headers=alice.headers)).json()
    ended = await snooze(client, alice.headers, None)

    assert read["snoozed_until"] is None
    assert ended.status_code == 200
    assert [u.version for u in await user_updates(runtime, alice.id)] == [1]


async def test_a_snooze_lasts_at_most_seven_days(
    client: httpx.AsyncClient, runtime: MessageService
) -> None:
    alice = await register(client, "alice")
    now = utc_now()

    week = await snooze(client, alice.headers, now + timedelta(days=7, seconds=-60))
    too_far = await snooze(client, alice.headers, now + timedelta(days=7, seconds=60))
    for_ever = await snooze(client, alice.headers, "9999-12-31T23:59:59-01:00")

    assert week.status_code == 200
    assert too_far.status_code == for_ever.status_code == 422
    assert "at most 7 days" in too_far.json()["detail"]
    read = (await client.get("/users/me/preferences", headers=alice.headers)).json()
    assert instant(read["snoozed_until"]) == instant(week.json()["snoozed_until"])
    assert [u.version for u in await user_updates(runtime, alice.id)] == [1, 2]


@pytest.mark.parametrize(
    "body",
    [
        {},  # until must be said, even if null
        {"until": "2030-01-01T00:00:00"},  # no offset
        {"until": 1_900_000_000},  # a number
        {"until": "tomorrow"},
        {"until": None, "quiet": True},
    ],
)
async def test_invalid_snoozes_are_422(client: httpx.AsyncClient, body: dict[str, Any]) -> None:
    alice = await register(client, "alice")

    response = await client.put("/users/me/snooze", json=body, headers=alice.headers)

    assert response.status_code == 422


async def test_every_known_time_zone_fits_the_documented_pattern(
    client: httpx.AsyncClient,
) -> None:
    """The schema never refuses a zone the server would take."""
    document = (await client.get("/openapi.json")).json()
    schema = document["components"]["schemas"]["QuietHoursBody"]["properties"]["time_zone"]

    names = zoneinfo.available_timezones() - {"localtime"}

    assert "Europe/Paris" in names
    for name in names:
        assert len(name) <= schema["maxLength"]
        assert re.search(schema["pattern"][:-1] + r"\Z", name), name
