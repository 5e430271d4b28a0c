"""The router's cache of recipients built from the projection: a version is built once, a new
version is built again, and the cache stays within its capacity."""

from __future__ import annotations

from sqlalchemy.ext.asyncio import AsyncEngine

from notification_router import repository
from tests.support.router_factories import NOW, user_updated
from tests.unit.notification_router.test_presence_projection import engine  # noqa: F401


async def test_a_version_is_built_once_and_a_new_one_again(engine: AsyncEngine) -> None:  # noqa: F811
    alice = user_updated(display_name="Alice", devices=1)
    await repository.upsert_recipient(engine, alice, now=NOW)
    cache = repository.RecipientCache()

    first = await repository.load_recipients(engine, [alice.user_id], cache)
    again = await repository.load_recipients(engine, [alice.user_id], cache)
    renamed = alice.model_copy(update={"version": 2, "display_name": "Alice B."})
    await repository.upsert_recipient(engine, renamed, now=NOW)
    changed = await repository.load_recipients(engine, [alice.user_id], cache)

    assert again[alice.user_id] is first[alice.user_id]
    assert changed[alice.user_id] is not first[alice.user_id]
    assert (changed[alice.user_id].version, changed[alice.user_id].display_name) == (
        2,
        "Alice B.",
    )
    # Built the same way without a cache.
    assert await repository.load_recipients(engine, [alice.user_id]) == changed


async def test_the_least_recently_used_goes_first(engine: AsyncEngine) -> None:  # noqa: F811
    alice, bob = user_updated(devices=1), user_updated(devices=1)
    for user in (alice, bob):
        await repository.upsert_recipient(engine, user, now=NOW)
    cache = repository.RecipientCache(capacity=1)

    first = await repository.load_recipients(engine, [alice.user_id], cache)
    await repository.load_recipients(engine, [bob.user_id], cache)
    rebuilt = await repository.load_recipients(engine, [alice.user_id], cache)

    assert rebuilt[alice.user_id] is not first[alice.user_id]
    assert rebuilt == first
