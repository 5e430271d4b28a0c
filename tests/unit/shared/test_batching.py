"""MicroBatcher: items submitted together are processed together, each caller gets its own
result, and a batch never takes more than it may."""

from __future__ import annotations

import asyncio

import pytest

from herald_shared.batching import MicroBatcher


class Recorder:
    """A `process` that records its batches and answers each item doubled, waiting for
    `gate` if one is set."""

    def __init__(self) -> None:
        self.batches: list[list[int]] = []
        self.gate: asyncio.Event | None = None
        self.fail_with: Exception | None = None

    async def __call__(self, items: list[int]) -> list[int]:
        self.batches.append(list(items))
        if self.gate is not None:
            await self.gate.wait()
        if self.fail_with is not None:
            raise self.fail_with
        return [item * 2 for item in items]


async def test_items_submitted_in_one_turn_go_in_one_batch() -> None:
    process = Recorder()
    batcher = MicroBatcher(process, name="t", max_size=100)

    results = await asyncio.gather(*(batcher.submit(item) for item in range(5)))

    assert results == [0, 2, 4, 6, 8]
    assert process.batches == [[0, 1, 2, 3, 4]]


async def test_a_batch_takes_at_most_max_size_counted_by_size() -> None:
    process = Recorder()
    batcher = MicroBatcher(process, name="t", max_size=5, max_concurrent=3, size=lambda item: item)

    await asyncio.gather(*(batcher.submit(item) for item in (2, 2, 2, 4, 1, 9)))

    # In order, three at once; an item larger than max_size still goes, alone, once one ended.
    assert process.batches == [[2, 2], [2], [4, 1], [9]]


async def test_items_arriving_while_a_batch_runs_wait_and_go_together() -> None:
    process = Recorder()
    process.gate = asyncio.Event()
    batcher = MicroBatcher(process, name="t", max_size=100, max_concurrent=1)

    first = asyncio.create_task(batcher.submit(1))
    await asyncio.sleep(0.01)
    later = [asyncio.create_task(batcher.submit(item)) for item in (2, 3, 4)]
    await asyncio.sleep(0.01)
    assert process.batches == [[1]]
    assert batcher.waiting == 3
    process.gate.set()

    assert await first == 2
    assert [await task for task in later] == [4, 6, 8]
    assert process.batches == [[1], [2, 3, 4]]


async def test_urgent_items_go_in_the_next_batch_ahead_of_those_waiting() -> None:
    process = Recorder()
    process.gate = asyncio.Event()
    batcher = MicroBatcher(process, name="t", max_size=2, max_concurrent=2)

    running = [asyncio.create_task(batcher.submit(item)) for item in (0, 1, 2, 3)]
    await asyncio.sleep(0.01)
    assert process.batches == [[0, 1], [2, 3]]  # every place taken
    waiting = [asyncio.create_task(batcher.submit(item)) for item in (4, 5, 6)]
    await asyncio.sleep(0.01)
    urgent = [asyncio.create_task(batcher.submit(item, urgent=True)) for item in (10, 11, 12)]
    await asyncio.sleep(0.01)
    process.gate.set()
    await asyncio.gather(*running, *waiting, *urgent)

    # The first urgent item starts a batch of its own at once, beyond the two places; the
    # urgent ones that came meanwhile go next, ahead of the others, in their order.
    assert process.batches == [[0, 1], [2, 3], [10], [11, 12], [4, 5], [6]]


async def test_urgent_items_never_wait_for_a_batch_of_the_others_to_finish() -> None:
    process = Recorder()
    process.gate = asyncio.Event()
    batcher = MicroBatcher(process, name="t", max_size=100, max_concurrent=1)
    slow = asyncio.create_task(batcher.submit(1))
    await asyncio.sleep(0.01)
    assert batcher.in_progress == 1

    # The slow batch still holds the only place: the urgent item is processed meanwhile (its
    # own batch waits for the same gate, so it is let through alone).
    urgent = asyncio.create_task(batcher.submit(2, urgent=True))
    await asyncio.sleep(0.01)
    assert process.batches == [[1], [2]]
    assert batcher.in_progress == 2
    # An item of the others still waits for the place.
    other = asyncio.create_task(batcher.submit(3))
    await asyncio.sleep(0.01)
    assert process.batches == [[1], [2]]
    process.gate.set()
    assert [await task for task in (slow, urgent, other)] == [2, 4, 6]
    assert process.batches == [[1], [2], [3]]


async def test_a_failed_batch_fails_each_of_its_items_and_not_the_next() -> None:
    process = Recorder()
    process.fail_with = RuntimeError("database down")
    batcher = MicroBatcher(process, name="t", max_size=100)

    outcomes = await asyncio.gather(
        *(batcher.submit(item) for item in (1, 2)), return_exceptions=True
    )
    assert [type(outcome) for outcome in outcomes] == [RuntimeError, RuntimeError]

    process.fail_with = None
    assert await batcher.submit(3) == 6


async def test_a_caller_that_stops_waiting_leaves_its_item_in_the_batch() -> None:
    process = Recorder()
    process.gate = asyncio.Event()
    batcher = MicroBatcher(process, name="t", max_size=100)

    cancelled = asyncio.create_task(batcher.submit(1))
    other = asyncio.create_task(batcher.submit(2))
    await asyncio.sleep(0.01)
    cancelled.cancel()
    with pytest.raises(asyncio.CancelledError):
        await cancelled
    process.gate.set()

    assert await other == 4
    assert process.batches == [[1, 2]]  # processed all the same
    await batcher.drain()


async def test_a_process_that_answers_the_wrong_number_of_results_fails_the_batch() -> None:
    async def short(items: list[int]) -> list[int]:
        return items[:-1]

    batcher = MicroBatcher(short, name="t", max_size=100)
    with pytest.raises(RuntimeError, match="1 results for a batch of 2"):
        await asyncio.gather(batcher.submit(1), batcher.submit(2))


async def test_linger_gathers_items_that_come_soon_after() -> None:
    process = Recorder()
    # A linger far longer than the gap, so a loaded machine's stalls cannot split the batch.
    batcher = MicroBatcher(process, name="t", max_size=100, linger=0.5)

    first = asyncio.create_task(batcher.submit(1))
    await asyncio.sleep(0.01)
    second = asyncio.create_task(batcher.submit(2))

    assert (await first, await second) == (2, 4)
    assert process.batches == [[1, 2]]


async def _turns(count: int) -> None:
    for _ in range(count):
        await asyncio.sleep(0)


async def test_without_lone_items_linger_an_item_that_came_alone_starts_at_once() -> None:
    """The first item, and one that comes a linger or more after the one before, start their
    batch within a turn or two of the event loop; one that comes soon after another lingers."""
    process = Recorder()
    batcher = MicroBatcher(process, name="t", max_size=100, linger=0.5, lone_items_linger=False)

    first = asyncio.create_task(batcher.submit(1))
    await _turns(3)
    assert process.batches == [[1]]  # not a linger later
    assert await first == 2

    soon_after = asyncio.create_task(batcher.submit(2))
    await asyncio.sleep(0.01)
    assert process.batches == [[1]]  # 2 waits for company
    third = asyncio.create_task(batcher.submit(3))
    assert (await soon_after, await third) == (4, 6)
    assert process.batches == [[1], [2, 3]]

    await asyncio.sleep(0.6)  # a pause longer than the linger
    after_a_pause = asyncio.create_task(batcher.submit(4))
    await _turns(3)
    assert process.batches == [[1], [2, 3], [4]]
    assert await after_a_pause == 8


async def _one_lingering() -> tuple[Recorder, MicroBatcher[int, int], asyncio.Task[int]]:
    """A batcher with a linger far longer than the test, and item 1 waiting in it for company."""
    process = Recorder()
    batcher = MicroBatcher(process, name="t", max_size=100, linger=60)
    waiting = asyncio.create_task(batcher.submit(1))
    await asyncio.sleep(0.01)
    assert process.batches == []  # lingering
    return process, batcher, waiting


async def test_an_item_submitted_without_linger_starts_a_batch_at_once_in_its_place() -> None:
    """With a linger far longer than the test, an item submitted with `linger=False` starts a
    batch within a turn or two of the event loop, behind the items already waiting (it jumps no
    line, unlike an urgent one); the next item lingers again."""
    process, batcher, waiting = await _one_lingering()
    at_once = asyncio.create_task(batcher.submit(2, linger=False))
    await _turns(3)
    assert process.batches == [[1, 2]]
    assert (await waiting, await at_once) == (2, 4)

    lingering = asyncio.create_task(batcher.submit(3))
    await asyncio.sleep(0.01)
    assert process.batches == [[1, 2]]
    lingering.cancel()  # its item stays in the batcher, which the test drops


async def test_an_urgent_item_does_not_linger_and_takes_the_lingering_ones_along() -> None:
    """With a linger far longer than the test, an urgent item starts its batch at once, with the
    items already waiting for company (ahead of them)."""
    process, batcher, waiting = await _one_lingering()
    urgent = asyncio.create_task(batcher.submit(2, urgent=True))

    results = await asyncio.wait_for(asyncio.gather(urgent, waiting), timeout=5)
    assert list(results) == [4, 2]
    assert process.batches == [[2, 1]]


async def test_drain_waits_for_every_item_submitted() -> None:
    process = Recorder()
    process.gate = asyncio.Event()
    batcher = MicroBatcher(process, name="t", max_size=1, max_concurrent=1)
    tasks = [asyncio.create_task(batcher.submit(item)) for item in range(3)]
    await asyncio.sleep(0.01)
    process.gate.set()

    await batcher.drain()

    assert all(task.done() for task in tasks)
    assert process.batches == [[0], [1], [2]]


def test_settings_are_checked() -> None:
    with pytest.raises(ValueError, match="max_size"):
        MicroBatcher(Recorder(), name="t", max_size=0)
