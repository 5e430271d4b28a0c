"""E-mail verification in message-service: the signed tokens, the limits, the link's pages,
`POST /users/me/email/verification`, the snapshot's `email_verified` and the bounce count (the
`email_bounces` subscriber, through the in-memory broker)."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from urllib.parse import urlencode

import httpx
import pytest

from herald_shared.events import (
    EVENT_ADAPTER,
    EmailBounced,
    EmailVerificationRequested,
    address_digest,
    utc_now,
)
from herald_shared.topology import EMAIL_BOUNCED, EXCHANGE
from herald_shared.unsubscribe import UnsubscribeTokens
from message_service.app import MessageService, service_of
from message_service.email_verification import (
    EmailVerificationTokens,
    InvalidVerificationToken,
    address_key,
    bounces_unverify,
    retry_after_seconds,
)
from message_service.models import User
from tests.unit.message_service.helpers import (
    TEST_LINK_SECRET,
    Account,
    client_for,
    make_settings,
    outbox_rows,
    register,
    running_app,
    user_updates,
)

KEY = b"k" * 32
NOW = datetime(2026, 12, 3, 12, 0, tzinfo=UTC)
USER = uuid.UUID("12345678-1234-5678-1234-567812345678")


# --- the token ----------------------------------------------------------------------------------


def test_a_token_verifies_for_its_user_and_address_until_it_expires() -> None:
    tokens = EmailVerificationTokens(KEY)
    token = tokens.issue(USER, "ann@example.test", expires_at=NOW + timedelta(hours=24))

    assert tokens.user_of(token) == USER
    assert tokens.verify(token, address="ann@example.test", now=NOW) == USER
    with pytest.raises(InvalidVerificationToken, match="expired"):
        tokens.verify(token, address="ann@example.test", now=NOW + timedelta(hours=24))


def test_a_token_is_refused_for_another_address() -> None:
    tokens = EmailVerificationTokens(KEY)
    token = tokens.issue(USER, "ann@example.test", expires_at=NOW + timedelta(hours=1))

    for other in ("bob@example.test", "Ann@example.test", "ann@example.test "):
        with pytest.raises(InvalidVerificationToken, match="current e-mail address"):
            tokens.verify(token, address=other, now=NOW)


def test_a_tampered_token_is_refused_and_never_called_expired() -> None:
    tokens = EmailVerificationTokens(KEY)
    token = tokens.issue(USER, "ann@example.test", expires_at=NOW + timedelta(hours=1))
    user_hex, expires, signature = token.split(".")
    later = str(int(expires) + 3600)
    other_user = uuid.uuid4().hex
    flipped = ("A" if signature[0] != "A" else "B") + signature[1:]
    # Expired and forged at once: the forgery is what is reported.
    old = tokens.issue(USER, "ann@example.test", expires_at=NOW - timedelta(hours=1))
    old_forged = old[:-1] + ("A" if old[-1] != "A" else "B")

    for forged in (
        f"{user_hex}.{later}.{signature}",
        f"{other_user}.{expires}.{signature}",
        f"{user_hex}.{expires}.{flipped}",
        old_forged,
    ):
        with pytest.raises(InvalidVerificationToken, match="not valid"):
            tokens.verify(forged, address="ann@example.test", now=NOW)
    for malformed in ("", "abc", f"{user_hex}.{expires}", token + "x", f"x{token}"):
        with pytest.raises(InvalidVerificationToken, match="malformed"):
            tokens.verify(malformed, address="ann@example.test", now=NOW)
        with pytest.raises(InvalidVerificationToken, match="malformed"):
            tokens.user_of(malformed)


def test_another_key_or_label_never_verifies() -> None:
    tokens = EmailVerificationTokens(KEY)
    token = tokens.issue(USER, "ann@example.test", expires_at=NOW + timedelta(hours=1))
    unsubscribe = UnsubscribeTokens(KEY)

    with pytest.raises(InvalidVerificationToken):
        EmailVerificationTokens(b"o" * 32).verify(token, address="ann@example.test", now=NOW)
    # Both kinds have one shape and one secret; the labels keep them apart, both ways.
    unsubscribe_token = unsubscribe.issue(USER, now=NOW, lifetime=timedelta(hours=1))
    with pytest.raises(InvalidVerificationToken, match="not valid"):
        tokens.verify(unsubscribe_token, address="ann@example.test", now=NOW)
    with pytest.raises(ValueError, match="invalid unsubscribe link"):
        unsubscribe.verify(token, now=NOW)


def test_a_short_key_is_refused() -> None:
    with pytest.raises(ValueError, match="too short"):
        EmailVerificationTokens(b"short").issue(USER, "a@b.test", expires_at=NOW)


# --- the decisions ------------------------------------------------------------------------------


def test_the_per_address_limit_ignores_case_and_says_how_long_to_wait() -> None:
    assert address_key("Ann@Example.TEST") == address_key("ann@example.test")
    assert address_key("ann@example.test") != address_key("bob@example.test")
    interval = timedelta(minutes=10)
    assert retry_after_seconds(NOW, now=NOW, interval=interval) == 600
    assert retry_after_seconds(NOW, now=NOW + timedelta(seconds=599.5), interval=interval) == 1
    assert retry_after_seconds(NOW, now=NOW + timedelta(hours=1), interval=interval) == 1


def test_bounces_unverify_at_the_limit() -> None:
    assert not bounces_unverify(0, limit=3)
    assert not bounces_unverify(2, limit=3)
    assert bounces_unverify(3, limit=3)
    assert bounces_unverify(1, limit=1)


# --- through the API ----------------------------------------------------------------------------


async def verification_requests(
    runtime: MessageService, user_id: uuid.UUID
) -> list[EmailVerificationRequested]:
    events = [EVENT_ADAPTER.validate_json(row.payload) for row in await outbox_rows(runtime)]
    return [e for e in events if isinstance(e, EmailVerificationRequested) and e.user_id == user_id]


async def verified(client: httpx.AsyncClient, account: Account) -> bool:
    response = await client.get("/users/me", headers=account.headers)
    assert response.status_code == 200
    value: bool = response.json()["email_verified"]
    return value


async def follow(client: httpx.AsyncClient, token: str) -> tuple[httpx.Response, httpx.Response]:
    """The link's page, then its form's POST (to the form's action, as a browser would)."""
    page = await client.get("/verify-email", params={"token": token})
    action = f"/verify-email?{urlencode({'token': token})}"
    if "<form" in page.text:
        assert f'action="{action[1:]}"' in page.text.replace("&amp;", "&")
    return page, await client.post(action)


async def test_a_new_address_is_mailed_its_link_and_verified_by_the_post_only(
    client: httpx.AsyncClient, runtime: MessageService
) -> None:
    ann = await register(client, "ann")

    assert not await verified(client, ann)
    [request] = await verification_requests(runtime, ann.id)
    assert request.to_address == "ann@example.test"
    assert request.to_name == "Ann"
    assert timedelta(hours=23) < request.expires_at - utc_now() <= timedelta(hours=24)
    [snapshot] = await user_updates(runtime, ann.id)
    assert snapshot.email_verified is False

    page = await client.get("/verify-email", params={"token": request.token})
    assert page.status_code == 200
    assert '<form method="post"' in page.text
    assert page.headers["cache-control"] == "no-store"
    assert not await verified(client, ann)  # the GET changed nothing

    _, confirmed = await follow(client, request.token)
    assert confirmed.status_code == 200
    assert "Address confirmed" in confirmed.text
    assert await verified(client, ann)
    updates = await user_updates(runtime, ann.id)
    assert [u.email_verified for u in updates] == [False, True]
    assert updates[-1].version == 2

    page, again = await follow(client, request.token)
    assert "already confirmed" in page.text
    assert "already confirmed" in again.text
    assert len(await user_updates(runtime, ann.id)) == 2  # nothing changed
    answer = await client.post("/users/me/email/verification", headers=ann.headers)
    assert answer.status_code == 409


async def test_changing_the_address_starts_again_and_old_links_die(
    client: httpx.AsyncClient, runtime: MessageService
) -> None:
    ann = await register(client, "ann")
    [first] = await verification_requests(runtime, ann.id)
    await follow(client, first.token)
    assert await verified(client, ann)

    changed = await client.patch(
        "/users/me", json={"email": "ann2@example.test"}, headers=ann.headers
    )
    assert changed.status_code == 200
    assert changed.json()["email_verified"] is False
    assert (await user_updates(runtime, ann.id))[-1].email_verified is False
    [_, second] = await verification_requests(runtime, ann.id)
    assert second.to_address == "ann2@example.test"

    page, refused = await follow(client, first.token)
    assert page.status_code == refused.status_code == 400
    assert "not valid for your current e-mail address" in refused.text
    assert not await verified(client, ann)
    # The same name again changes nothing about the address.
    same = await client.patch("/users/me", json={"display_name": "Ann"}, headers=ann.headers)
    assert same.json()["email_verified"] is False

    _, confirmed = await follow(client, second.token)
    assert confirmed.status_code == 200
    assert await verified(client, ann)


async def test_bad_links_get_a_page_that_says_why(
    client: httpx.AsyncClient, runtime: MessageService
) -> None:
    ann = await register(client, "ann")
    tokens = EmailVerificationTokens(TEST_LINK_SECRET.encode())
    expired = tokens.issue(ann.id, "ann@example.test", expires_at=utc_now() - timedelta(seconds=1))
    nobody = tokens.issue(uuid.uuid4(), "x@example.test", expires_at=utc_now() + timedelta(hours=1))

    for token, reason in (
        (expired, "Expired verification link"),
        (nobody, "Invalid verification link"),
        ("nonsense", "Malformed verification link"),
    ):
        page, answer = await follow(client, token)
        assert page.status_code == answer.status_code == 400
        assert reason in answer.text
    assert not await verified(client, ann)


async def test_one_verification_mail_per_address_per_interval(
    client: httpx.AsyncClient, runtime: MessageService
) -> None:
    ann = await register(client, "ann")
    # Someone else registers the same address in other capitals: no second e-mail to it.
    other = await register(client, "other", email="ANN@example.test")

    assert len(await verification_requests(runtime, ann.id)) == 1
    assert await verification_requests(runtime, other.id) == []
    for account in (ann, other):
        answer = await client.post("/users/me/email/verification", headers=account.headers)
        assert answer.status_code == 429
        assert 590 <= int(answer.headers["retry-after"]) <= 600
        assert "retry after" in answer.json()["detail"]
    assert len(await verification_requests(runtime, ann.id)) == 1
    assert await verification_requests(runtime, other.id) == []


@pytest.fixture
async def no_wait_client(
    sqlite_url: str,
) -> AsyncIterator[tuple[httpx.AsyncClient, MessageService]]:
    settings = make_settings(sqlite_url, email_verification_interval=0)
    async with running_app(settings) as app, client_for(app) as client:
        yield client, service_of(app)


async def test_a_resend_after_the_interval_sends_a_new_link(
    no_wait_client: tuple[httpx.AsyncClient, MessageService],
) -> None:
    client, runtime = no_wait_client
    ann = await register(client, "ann")

    answer = await client.post("/users/me/email/verification", headers=ann.headers)

    assert answer.status_code == 202
    first, second = await verification_requests(runtime, ann.id)
    assert first.verification_id != second.verification_id
    # Either link works: both are for this address.
    _, confirmed = await follow(client, first.token)
    assert confirmed.status_code == 200


async def test_an_account_without_an_address_is_sent_no_link(
    no_wait_client: tuple[httpx.AsyncClient, MessageService],
) -> None:
    """An identity provider's account may come without an address: a link to "" was staged."""
    client, runtime = no_wait_client
    ann = await register(client, "ann")
    async with runtime.sessions() as session:
        user = await session.get(User, ann.id)
        assert user is not None
        user.email = ""
        await session.commit()

    answer = await client.post("/users/me/email/verification", headers=ann.headers)

    assert answer.status_code == 409
    assert answer.json() == {"detail": "your account has no e-mail address"}
    assert len(await verification_requests(runtime, ann.id)) == 1  # the registration's


async def test_with_verification_off_an_address_is_verified_at_once(sqlite_url: str) -> None:
    settings = make_settings(sqlite_url, email_verification=False)
    async with running_app(settings) as app, client_for(app) as client:
        runtime = service_of(app)
        ann = await register(client, "ann")
        assert await verified(client, ann)
        await client.patch("/users/me", json={"email": "new@example.test"}, headers=ann.headers)
        assert await verified(client, ann)
        assert await verification_requests(runtime, ann.id) == []
        assert all(u.email_verified for u in await user_updates(runtime, ann.id))


# --- bounces ------------------------------------------------------------------------------------


async def bounce(
    runtime: MessageService,
    user_id: uuid.UUID,
    address: str,
    notification_id: uuid.UUID | None = None,
) -> None:
    event = EmailBounced(
        user_id=user_id,
        notification_id=notification_id or uuid.uuid4(),
        address_digest=address_digest(address),
        reason="smtp 550 5.1.1",
    )
    await runtime.broker.publish(event, exchange=EXCHANGE, routing_key=EMAIL_BOUNCED)


async def test_hard_bounces_unverify_at_the_limit_once_each(
    client: httpx.AsyncClient, runtime: MessageService
) -> None:
    ann = await register(client, "ann")
    [request] = await verification_requests(runtime, ann.id)
    await follow(client, request.token)
    first = uuid.uuid4()

    await bounce(runtime, ann.id, "ann@example.test", first)
    await bounce(runtime, ann.id, "ann@example.test", first)  # redelivered: counted once
    await bounce(runtime, ann.id, "former@example.test")  # another address: not counted
    await bounce(runtime, uuid.uuid4(), "ann@example.test")  # nobody: nothing
    await bounce(runtime, ann.id, "ann@example.test")
    assert await verified(client, ann)  # two of three

    await bounce(runtime, ann.id, "ann@example.test")

    assert not await verified(client, ann)
    updates = await user_updates(runtime, ann.id)
    assert [u.email_verified for u in updates] == [False, True, False]
    # A new link (the interval has not passed: this address had one minutes ago)...
    resend = await client.post("/users/me/email/verification", headers=ann.headers)
    assert resend.status_code == 429
    # ... but the first one still verifies it again, and the count starts afresh.
    _, confirmed = await follow(client, request.token)
    assert confirmed.status_code == 200
    await bounce(runtime, ann.id, "ann@example.test")
    await bounce(runtime, ann.id, "ann@example.test")
    assert await verified(client, ann)
    mock = runtime.subscribers.on_email_bounced.mock
    assert mock is not None
    assert mock.call_count == 8
