"""An ASGI app served by uvicorn in a daemon thread on a free loopback port: the HTTP fakes'
(and the browser test's) common part."""

from __future__ import annotations

import socket
import threading
import time
from typing import Any

import uvicorn

LOOPBACK = "127.0.0.1"


class ServedApp:
    """Starts serving at once; `stop()` ends it. Lifespan off, and the test process's logging
    left alone."""

    def __init__(self, app: Any, name: str, *, host: str = LOOPBACK) -> None:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, 0))
        self.port: int = sock.getsockname()[1]
        self.base_url = f"http://{host}:{self.port}"
        config = uvicorn.Config(
            app,
            log_config=None,
            log_level="warning",
            access_log=False,
            lifespan="off",
            timeout_graceful_shutdown=2,
        )
        self._server = uvicorn.Server(config)
        self._thread = threading.Thread(
            target=self._server.run, kwargs={"sockets": [sock]}, name=name, daemon=True
        )
        self._thread.start()
        deadline = time.monotonic() + 10
        while not self._server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError(f"{name} did not start")
            time.sleep(0.01)

    def stop(self) -> None:
        self._server.should_exit = True
        self._thread.join(timeout=10)
