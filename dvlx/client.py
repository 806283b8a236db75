"""A synchronous client for `python -m dvlx.serve` (and other servers speaking openpi's websocket protocol).

    client = PolicyClient("localhost", 8000)
    client.metadata["horizon"], client.metadata["cameras"]             # sent by the server on connect
    reply = client.infer({"images": {...}, "proprio": state, "instruction": "lift the cube"}, steps=4)
    reply["actions"]                                                   # float32 [H, A], robot units
    executor = ChunkExecutor(lambda obs: client.predict(obs, open_loop_steps=4), open_loop_steps=4)

Needs only numpy, msgpack and websockets (no torch). One connection, used under a lock, so a client may be
shared by threads; requests from one client are answered in order.
"""

from __future__ import annotations

import http.client
import threading
import time
from collections.abc import Mapping
from typing import Any
from urllib.parse import urlsplit

import numpy as np
from websockets.sync.client import ClientConnection, connect

from dvlx.msgpack_numpy import packb, unpackb

DEFAULT_PORT = 8000
HEALTH_PATH = "/healthz"


class PolicyServerError(RuntimeError):
    """The server answered a request with an error (the message says which key and what was expected)."""


class PolicyClient:
    def __init__(
        self,
        host: str = "localhost",
        port: int | None = DEFAULT_PORT,
        *,
        connect_timeout_s: float = 30.0,
        timeout_s: float | None = None,
    ) -> None:
        """Connects to `ws://host:port` (or to `host` when it is a ws:// or wss:// URI), retrying while the
        server starts, for up to `connect_timeout_s`; `timeout_s` bounds each reply (None: no bound)."""
        uri = host if host.startswith(("ws://", "wss://")) else f"ws://{host}"
        if port is not None and urlsplit(uri).port is None:
            uri = f"{uri}:{port}"
        parts = urlsplit(uri)
        self.uri = uri
        self.host = parts.hostname or "localhost"
        self.port = parts.port or (443 if parts.scheme == "wss" else 80)
        self.timeout_s = timeout_s
        self._lock = threading.Lock()
        self._connection = self._connect(connect_timeout_s)
        self.metadata: dict = self._receive()

    def _connect(self, timeout_s: float) -> ClientConnection:
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                # legacy=True: the connection itself, closed by `close()` (websockets 17 asks to say so).
                return connect(self.uri, compression=None, max_size=None, open_timeout=timeout_s, legacy=True)
            except (ConnectionRefusedError, ConnectionResetError) as error:
                if time.monotonic() > deadline:
                    message = f"no policy server at {self.uri} after {timeout_s} s: {error}"
                    raise ConnectionError(message) from None
                time.sleep(0.2)

    def _receive(self) -> Any:
        message = self._connection.recv(timeout=self.timeout_s)
        if isinstance(message, str):
            # openpi's server sends its traceback as a text frame before closing.
            raise PolicyServerError(f"policy server at {self.uri} failed:\n{message}")
        return unpackb(message)

    def infer(self, observation: Mapping, **settings: Any) -> dict:
        """The server's reply to `observation` with the decoding `settings` (`steps`, `open_loop_steps`;
        None entries are left out): {"actions": [H, A], "server_timing": {...}}. Raises `PolicyServerError`
        when the server refuses the request."""
        request = dict(observation)
        request.update({k: v for k, v in settings.items() if v is not None})
        with self._lock:
            self._connection.send(packb(request))
            reply = self._receive()
        if isinstance(reply, dict) and "error" in reply:
            raise PolicyServerError(str(reply["error"]))
        return reply

    def predict(self, observation: Mapping, **settings: Any) -> np.ndarray:
        """Only the action chunk [H, A] (or [open_loop_steps, A]) of `infer`."""
        return self.infer(observation, **settings)["actions"]

    def health(self, timeout_s: float = 5.0) -> bool:
        """Whether `GET /healthz` answers 200 OK."""
        kind = http.client.HTTPSConnection if self.uri.startswith("wss://") else http.client.HTTPConnection
        connection = kind(self.host, self.port, timeout=timeout_s)
        try:
            connection.request("GET", HEALTH_PATH)
            return connection.getresponse().status == http.HTTPStatus.OK
        except OSError:
            return False
        finally:
            connection.close()

    def close(self) -> None:
        self._connection.close()

    def __enter__(self) -> PolicyClient:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
