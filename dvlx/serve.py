"""`python -m dvlx.serve --policy EXPORT --port P`: serve action chunks of an exported VLA over websockets.

The wire format is openpi's (see docs/serving.md): every message is msgpack with numpy arrays encoded by
`dvlx.msgpack_numpy`. On connect the server sends its metadata (the action spec: horizon, action dim, cameras,
image size, proprio dim, ...); then each binary request is one observation (`images`, `proprio`,
`instruction`) plus optional decoding settings (`steps`, `open_loop_steps`), answered with
{"actions": float32 [H, A] in robot units, "server_timing": {...}} or {"error": "..."}. A bad request gets an
error reply naming the key and what was expected, and the connection stays open.

Requests from all connections go through one queue: the batcher waits up to `batch_timeout_ms` after the
first request for up to `max_batch` requests, splits them by the settings that change inference (`steps`) and
runs `Policy.predict_batch` once per group in a single worker thread, so the event loop keeps answering
(health checks, other connections, keepalive pings) while the model runs. `GET /healthz` answers 200 OK
(503 while shutting down). SIGINT/SIGTERM stop accepting connections, finish the queued requests and exit.
"""

from __future__ import annotations

import argparse
import asyncio
import http
import logging
import signal
import sys
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

import numpy as np
from websockets.asyncio.server import ServerConnection, serve
from websockets.exceptions import ConnectionClosed
from websockets.http11 import Request, Response

import dvlx
from dvlx.msgpack_numpy import DecodeError, packb, unpackb
from dvlx.policy import Policy, SpecMismatchError
from dvlx.processing.robot import ActionSpec

log = logging.getLogger("dvlx.serve")

PROTOCOL_VERSION = 1
DEFAULT_PORT = 8000
HEALTH_PATH = "/healthz"
OBSERVATION_KEYS = ("images", "proprio", "instruction")
SETTING_KEYS = ("steps", "open_loop_steps")
# A request's `steps` runs the model that many times while every other client waits; cap what one client
# may ask for.
MAX_REQUEST_STEPS = 1000
# Largest request accepted (a few uncompressed camera images fit many times over).
MAX_MESSAGE_BYTES = 64 * 2**20


class RequestError(ValueError):
    """A request that does not follow the protocol or the policy's spec; the message is sent to the client."""


@dataclass(frozen=True)
class Settings:
    """Per-request decoding settings; None means the server's default."""

    steps: int | None = None
    open_loop_steps: int | None = None


# ------------------------------------------------------------------------------------------- requests
def _describe(value: Any) -> str:
    if isinstance(value, np.ndarray):
        return f"{value.dtype} array of shape {list(value.shape)}"
    return type(value).__name__


def _positive_int(name: str, value: Any, high: int) -> int:
    is_int = isinstance(value, (int, np.integer)) and not isinstance(value, (bool, np.bool_))
    if not is_int or not 1 <= value <= high:
        raise RequestError(f"request['{name}']: expected an int in [1, {high}] or nil, got {value!r}")
    return int(value)


def _image(camera: str, value: Any) -> np.ndarray:
    key = f"request['images']['{camera}']"
    if not isinstance(value, np.ndarray):
        raise RequestError(f"{key}: expected a uint8 array [height, width, 3], got {_describe(value)}")
    if value.dtype != np.uint8:
        raise RequestError(f"{key}: expected dtype uint8 (RGB 0..255), got {value.dtype}")
    if value.ndim != 3 or value.shape[-1] != 3 or 0 in value.shape:
        raise RequestError(
            f"{key}: expected shape [height, width, 3] (RGB, channels last), got {list(value.shape)}"
        )
    return value


def _proprio(value: Any, spec: ActionSpec) -> np.ndarray:
    expected = f"a float array of shape [{spec.proprio_dim}] ({', '.join(spec.proprio_names)})"
    if isinstance(value, (list, tuple)) and all(
        isinstance(v, (int, float)) and not isinstance(v, bool) for v in value
    ):
        value = np.asarray(value, dtype=np.float64)
    if not isinstance(value, np.ndarray):
        raise RequestError(f"request['proprio']: expected {expected}, got {_describe(value)}")
    if value.dtype.kind not in "fiu":
        raise RequestError(f"request['proprio']: expected {expected}, got dtype {value.dtype}")
    if value.shape != (spec.proprio_dim,):
        raise RequestError(f"request['proprio']: expected {expected}, got shape {list(value.shape)}")
    if not np.all(np.isfinite(value)):
        raise RequestError("request['proprio']: values must be finite, got NaN or inf")
    return value.astype(np.float32)


def parse_request(message: bytes | str, spec: ActionSpec) -> tuple[dict, Settings]:
    """The observation (in `Policy.predict`'s form) and settings of one request message; `RequestError`
    naming the offending key and what was expected otherwise."""
    if isinstance(message, str):
        raise RequestError("request: expected a binary msgpack message, got a text frame")
    try:
        data = unpackb(message)
    except DecodeError as error:
        raise RequestError(f"request: {error}") from None
    if not isinstance(data, dict):
        raise RequestError(f"request: expected a msgpack map of observation keys, got {_describe(data)}")
    known = OBSERVATION_KEYS + SETTING_KEYS
    unknown = sorted(map(str, set(data) - set(known)))
    if unknown:
        raise RequestError(f"request has unknown keys {unknown}; expected keys among {list(known)}")

    images = data.get("images")
    if not isinstance(images, dict):
        raise RequestError(
            f"request['images']: expected a map from camera name to a uint8 [height, width, 3] array for "
            f"cameras {spec.cameras}, got {'nothing' if images is None else _describe(images)}"
        )
    extra = sorted(map(str, set(images) - set(spec.cameras)))
    if extra:
        raise RequestError(f"request['images'] has unknown cameras {extra}; the policy uses {spec.cameras}")
    missing = [c for c in spec.cameras if c not in images]
    if missing:
        raise RequestError(f"request['images'] lacks cameras {missing}; the policy uses {spec.cameras}")
    observation: dict[str, Any] = {"images": {c: _image(c, images[c]) for c in spec.cameras}}

    if spec.proprio_dim:
        if data.get("proprio") is None:
            raise RequestError(
                f"request lacks 'proprio': expected a float array of shape [{spec.proprio_dim}] "
                f"({', '.join(spec.proprio_names)})"
            )
        observation["proprio"] = _proprio(data["proprio"], spec)
    elif data.get("proprio") is not None:
        raise RequestError("request['proprio']: this policy takes no proprio (proprio_dim 0); leave it out")

    instruction = data.get("instruction")
    if not isinstance(instruction, str):
        got = "nothing" if instruction is None else _describe(instruction)
        raise RequestError(f"request['instruction']: expected a string, got {got}")
    observation["instruction"] = instruction

    steps = data.get("steps")
    open_loop = data.get("open_loop_steps")
    settings = Settings(
        steps=None if steps is None else _positive_int("steps", steps, MAX_REQUEST_STEPS),
        open_loop_steps=(
            None if open_loop is None else _positive_int("open_loop_steps", open_loop, spec.horizon)
        ),
    )
    return observation, settings


def server_metadata(policy: Policy, *, steps: int | None, max_batch: int) -> dict:
    """What a client needs to build requests; sent as the first message of every connection."""
    spec = policy.spec
    return {
        "server": "dvlx",
        "protocol_version": PROTOCOL_VERSION,
        "dvlx_version": dvlx.__version__,
        "policy": policy.source,
        "objective": getattr(policy.objective, "name", type(policy.objective).__name__),
        "horizon": spec.horizon,
        "action_dim": spec.action_dim,
        "action_names": list(spec.action_names),
        "control_hz": spec.control_hz,
        "cameras": list(spec.cameras),
        "image_size": spec.image_size,
        "proprio_dim": spec.proprio_dim,
        "proprio_names": list(spec.proprio_names),
        "instruction_required": True,
        "action_spec_fingerprint": spec.fingerprint(),
        "default_steps": steps,
        "max_batch": max_batch,
        "observation_keys": list(OBSERVATION_KEYS),
        "setting_keys": list(SETTING_KEYS),
    }


# --------------------------------------------------------------------------------------------- server
@dataclass
class _Pending:
    observation: dict
    settings: Settings
    received: float
    future: asyncio.Future


class PolicyServer:
    """Serves one `Policy` over websockets; `serve()` runs it on the current event loop."""

    def __init__(
        self,
        policy: Policy,
        *,
        host: str = "127.0.0.1",
        port: int = DEFAULT_PORT,
        max_batch: int = 8,
        batch_timeout_ms: float = 5.0,
        steps: int | None = None,
    ) -> None:
        if max_batch < 1:
            raise ValueError(f"max_batch must be >= 1, got {max_batch}")
        if batch_timeout_ms < 0:
            raise ValueError(f"batch_timeout_ms must be >= 0, got {batch_timeout_ms}")
        if steps is not None and steps < 1:
            raise ValueError(f"steps must be >= 1 or None, got {steps}")
        self.policy = policy
        self.host = host
        self.port = port
        self.max_batch = max_batch
        self.batch_timeout_s = batch_timeout_ms / 1000
        self.steps = steps
        self.metadata = server_metadata(policy, steps=steps, max_batch=max_batch)
        self._queue: asyncio.Queue[_Pending] | None = None
        self._in_flight = 0
        self._closing = False

    async def serve(self, stop: asyncio.Event, ready: Callable[[int], None] | None = None) -> None:
        """Serve until `stop` is set, then finish the queued requests and close. `ready(port)` is called once
        the socket listens (with `port=0` the system picks the port, stored in `self.port`)."""
        self._queue = asyncio.Queue()
        self._closing = False
        executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="dvlx-serve-infer")
        batcher = asyncio.create_task(self._batch_loop(executor))
        try:
            async with serve(
                self._handle,
                self.host,
                self.port,
                process_request=self._process_request,
                compression=None,
                max_size=MAX_MESSAGE_BYTES,
            ) as server:
                self.port = server.sockets[0].getsockname()[1]
                log.info(
                    "serving %s on ws://%s:%d (health: http://%s:%d%s), max batch %d, batch timeout %.1f ms",
                    self.policy.source, self.host, self.port, self.host, self.port, HEALTH_PATH,
                    self.max_batch, self.batch_timeout_s * 1000,
                )
                if ready is not None:
                    ready(self.port)
                await stop.wait()
                log.info("shutting down: finishing %d queued request(s)", self._in_flight)
                self._closing = True
                while self._in_flight:
                    await asyncio.sleep(0.01)
                server.close()
                await server.wait_closed()
        finally:
            batcher.cancel()
            await asyncio.gather(batcher, return_exceptions=True)
            executor.shutdown(wait=True)
            log.info("server stopped")

    def _process_request(self, connection: ServerConnection, request: Request) -> Response | None:
        if urlsplit(request.path).path != HEALTH_PATH:
            return None
        if self._closing:
            return connection.respond(http.HTTPStatus.SERVICE_UNAVAILABLE, "shutting down\n")
        return connection.respond(http.HTTPStatus.OK, "OK\n")

    async def _handle(self, connection: ServerConnection) -> None:
        peer = connection.remote_address
        log.info("connection from %s opened", peer)
        loop = asyncio.get_running_loop()
        previous_total_ms = None
        try:
            await connection.send(packb(self.metadata))
            async for message in connection:
                received = time.perf_counter()
                try:
                    if self._closing:
                        raise RequestError("the server is shutting down")
                    observation, settings = parse_request(message, self.policy.spec)
                except RequestError as error:
                    log.warning("request from %s refused: %s", peer, error)
                    await connection.send(packb({"error": str(error)}))
                    continue
                self._in_flight += 1
                try:
                    pending = _Pending(observation, settings, received, loop.create_future())
                    self._queue.put_nowait(pending)
                    reply = await pending.future
                finally:
                    self._in_flight -= 1
                if previous_total_ms is not None and "server_timing" in reply:
                    reply["server_timing"]["prev_total_ms"] = previous_total_ms
                await connection.send(packb(reply))
                previous_total_ms = (time.perf_counter() - received) * 1000
        except ConnectionClosed:
            pass
        log.info("connection from %s closed", peer)

    async def _batch_loop(self, executor: ThreadPoolExecutor) -> None:
        loop = asyncio.get_running_loop()
        while True:
            batch = [await self._queue.get()]
            deadline = loop.time() + self.batch_timeout_s
            while len(batch) < self.max_batch:
                remaining = deadline - loop.time()
                try:
                    if remaining <= 0:
                        batch.append(self._queue.get_nowait())
                    else:
                        batch.append(await asyncio.wait_for(self._queue.get(), remaining))
                except (asyncio.QueueEmpty, TimeoutError):
                    break
            groups: dict[int | None, list[_Pending]] = {}
            for pending in batch:
                groups.setdefault(pending.settings.steps, []).append(pending)
            for steps, group in groups.items():
                await self._run_group(loop, executor, steps, group)

    async def _run_group(self, loop, executor: ThreadPoolExecutor, steps: int | None, group: list[_Pending]):
        start = time.perf_counter()
        effective_steps = steps if steps is not None else self.steps
        results = await loop.run_in_executor(
            executor, self._predict, [p.observation for p in group], effective_steps
        )
        infer_ms = (time.perf_counter() - start) * 1000
        log.info(
            "batch of %d request(s), steps=%s: %.1f ms",
            len(group), "default" if effective_steps is None else effective_steps, infer_ms,
        )
        for pending, (actions, error) in zip(group, results, strict=True):
            if pending.future.done():
                continue
            if error is not None:
                pending.future.set_result({"error": error})
                continue
            if pending.settings.open_loop_steps is not None:
                actions = actions[: pending.settings.open_loop_steps]
            timing = {
                "infer_ms": infer_ms,
                "queue_ms": (start - pending.received) * 1000,
                "batch_size": len(group),
            }
            pending.future.set_result({"actions": actions, "server_timing": timing})

    def _predict(
        self, observations: Sequence[Mapping], steps: int | None
    ) -> list[tuple[np.ndarray | None, str | None]]:
        """Runs in the worker thread. When the batch fails, each observation is retried alone so that one
        bad request does not fail the others."""
        try:
            return [(a, None) for a in self.policy.predict_batch(observations, steps=steps)]
        except Exception:
            if len(observations) == 1:
                return [(None, _inference_error(observations[0]))]
        results = []
        for observation in observations:
            try:
                results.append((self.policy.predict_batch([observation], steps=steps)[0], None))
            except Exception:
                results.append((None, _inference_error(observation)))
        return results


def _inference_error(observation: Mapping) -> str:
    """The reply text for the exception being handled (a spec mismatch, or an unexpected failure, logged)."""
    error = sys.exc_info()[1]
    if isinstance(error, SpecMismatchError):
        return f"observation does not match the policy: {error}"
    log.exception("inference failed for an observation with keys %s", sorted(observation))
    return f"inference failed: {type(error).__name__}: {error}"


class ServerThread:
    """A `PolicyServer` on its own event loop in a daemon thread (tests, benchmarks, in-process use).

        with ServerThread(PolicyServer(policy, port=0)) as port:
            client = PolicyClient("127.0.0.1", port)
    """

    def __init__(self, server: PolicyServer) -> None:
        self.server = server
        self._ready = threading.Event()
        self._error: BaseException | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Event | None = None
        self._thread = threading.Thread(target=self._run, name="dvlx-serve", daemon=True)

    def _run(self) -> None:
        async def main() -> None:
            self._loop = asyncio.get_running_loop()
            self._stop = asyncio.Event()
            await self.server.serve(self._stop, ready=lambda _: self._ready.set())

        try:
            asyncio.run(main())
        except BaseException as error:  # reported to the caller of start()
            self._error = error
        finally:
            self._ready.set()

    def start(self, timeout_s: float = 60.0) -> int:
        """Starts the thread and returns the port once the server listens."""
        self._thread.start()
        if not self._ready.wait(timeout_s):
            raise TimeoutError(f"the policy server did not start within {timeout_s} s")
        if self._error is not None:
            raise RuntimeError(f"the policy server failed to start: {self._error}") from self._error
        return self.server.port

    def stop(self, timeout_s: float = 60.0) -> None:
        if self._loop is not None and self._stop is not None and self._thread.is_alive():
            self._loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(timeout_s)

    def __enter__(self) -> int:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


# ------------------------------------------------------------------------------------------------ CLI
async def _serve_until_signal(server: PolicyServer) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    await server.serve(stop)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m dvlx.serve", description="Serve action chunks of a dvlx VLA export over websockets."
    )
    parser.add_argument("--policy", required=True, help="export folder written by the VLA stage")
    parser.add_argument("--host", default="127.0.0.1", help="interface to bind; 0.0.0.0 for remote robots")
    parser.add_argument("--port", type=int, default=DEFAULT_PORT, help="0 picks a free port (logged)")
    parser.add_argument("--max-batch", type=int, default=8, help="most requests per model call")
    parser.add_argument(
        "--batch-timeout-ms", type=float, default=5.0,
        help="how long the first request of a batch waits for others",
    )
    parser.add_argument("--steps", type=int, default=None, help="default sampling steps")
    parser.add_argument("--device", default="cpu", help="torch device of the policy, e.g. cuda:0")
    parser.add_argument("--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"])
    args = parser.parse_args(argv)
    logging.basicConfig(level=args.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    # websockets logs every handshake failure (e.g. health probes) at INFO; keep its errors only.
    logging.getLogger("websockets").setLevel(max(logging.WARNING, logging.getLevelName(args.log_level)))
    try:
        server = PolicyServer(
            Policy.from_pretrained(args.policy, device=args.device),
            host=args.host,
            port=args.port,
            max_batch=args.max_batch,
            batch_timeout_ms=args.batch_timeout_ms,
            steps=args.steps,
        )
    except (FileNotFoundError, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    asyncio.run(_serve_until_signal(server))
    return 0


if __name__ == "__main__":
    sys.exit(main())
