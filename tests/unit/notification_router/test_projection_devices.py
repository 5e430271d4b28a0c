"""The recipient projection keeps what push-sender needs about each device: the token's
registration time (APNs' 410 rule) and a browser's Web Push keys; rows stored before these
fields existed still load."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime

from sqlalchemy import update

from herald_shared.database import make_engine, run_migrations
from herald_shared.events import DeviceSnapshot, Platform, WebPushKeys
from notification_router import repository
from notification_router.tables import recipients
from tests.support.router_factories import NOW, user_updated


async def test_device_registration_time_and_keys_survive_the_projection(sqlite_url: str) -> None:
    engine = make_engine(sqlite_url)
    await run_migrations(
        engine, script_location="notification_router:migrations", service_name="router-test"
    )
    registered = datetime(2026, 1, 20, 8, 30, tzinfo=UTC)
    keys = WebPushKeys(p256dh="BCVxsr7N_eNgVRqvHtD0zTZsEc6", auth="BTBZMqHH6r4Tts7J_aSIgg")
    browser = DeviceSnapshot(
        device_id=uuid.uuid4(),
        platform=Platform.WEB_PUSH,
        token="https://web.push.apple.com/QGuQyavXutnMH",
        token_updated_at=registered,
        web_push_keys=keys,
    )
    snapshot = user_updated(devices=0).model_copy(update={"devices": [browser]})
    try:
        assert await repository.upsert_recipient(engine, snapshot, now=NOW)
        [stored] = (await repository.load_recipients(engine, [snapshot.user_id]))[
            snapshot.user_id
        ].devices
        assert (stored.token, stored.token_updated_at, stored.web_push_keys) == (
            browser.token,
            registered,
            keys,
        )

        # A row written by the previous version of the router: no such fields.
        old_shape = [{"device_id": str(browser.device_id), "platform": "fcm", "token": "fcm-token"}]
        async with engine.begin() as connection:
            await connection.execute(update(recipients).values(devices=old_shape))
        [old] = (await repository.load_recipients(engine, [snapshot.user_id]))[
            snapshot.user_id
        ].devices
        assert (old.platform, old.token_updated_at, old.web_push_keys) == (
            Platform.FCM,
            None,
            None,
        )
    finally:
        await engine.dispose()


async def test_the_privacy_setting_survives_the_projection(sqlite_url: str) -> None:
    engine = make_engine(sqlite_url)
    await run_migrations(
        engine, script_location="notification_router:migrations", service_name="router-test"
    )
    base = user_updated(devices=1)
    private = base.model_copy(
        update={"preferences": base.preferences.model_copy(update={"push_preview": False})}
    )
    try:
        assert await repository.upsert_recipient(engine, private, now=NOW)
        loaded = (await repository.load_recipients(engine, [private.user_id]))[private.user_id]
    finally:
        await engine.dispose()
    assert loaded.push_preview is False


async def test_the_projection_keeps_whether_the_address_is_verified(sqlite_url: str) -> None:
    engine = make_engine(sqlite_url)
    await run_migrations(
        engine, script_location="notification_router:migrations", service_name="router-test"
    )
    unverified = user_updated(email_verified=False)
    verified = unverified.model_copy(update={"version": 2, "email_verified": True})
    try:
        assert await repository.upsert_recipient(engine, unverified, now=NOW)
        loaded = await repository.load_recipients(engine, [unverified.user_id])
        assert loaded[unverified.user_id].email_verified is False

        assert await repository.upsert_recipient(engine, verified, now=NOW)
        assert not await repository.upsert_recipient(engine, unverified, now=NOW)  # older
        loaded = await repository.load_recipients(engine, [unverified.user_id])
        assert loaded[unverified.user_id].email_verified is True
    finally:
        await engine.dispose()
