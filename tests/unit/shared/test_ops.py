"""The server every service runs (`herald_shared.ops`): once the application has started, what it
built is frozen out of the garbage collector's sight and full collections come a tenth as often."""

from __future__ import annotations

import gc
import socket
from collections.abc import Iterator
from typing import Any

import pytest
import uvicorn

from herald_shared.ops import FULL_COLLECTION_EVERY, _Server


async def app(scope: Any, receive: Any, send: Any) -> None:  # never called: nothing connects
    raise AssertionError("no request expected")


@pytest.fixture
def collector() -> Iterator[None]:
    """The collector's state as this process had it, restored afterwards."""
    threshold = gc.get_threshold()
    yield
    gc.unfreeze()
    gc.set_threshold(*threshold)


@pytest.mark.usefixtures("collector")
async def test_a_started_server_freezes_what_exists_and_spaces_full_collections() -> None:
    gc.unfreeze()
    young, middle, _ = gc.get_threshold()
    config = uvicorn.Config(app, lifespan="off", log_config=None)
    server = _Server(config, on_shutdown=None)
    config.load()  # as `uvicorn.Server.serve` does before its start-up
    server.lifespan = config.lifespan_class(config)
    with socket.socket() as listening:
        listening.bind(("127.0.0.1", 0))
        await server.startup(sockets=[listening])
        try:
            assert gc.get_freeze_count() > 0
            assert gc.get_threshold() == (young, middle, FULL_COLLECTION_EVERY)
        finally:
            await server.shutdown(sockets=[listening])
