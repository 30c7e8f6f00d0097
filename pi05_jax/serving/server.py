"""An openpi-compatible websocket policy server (openpi's `WebsocketPolicyServer` protocol) that stays up.

Protocol, as upstream: on connect the server sends the policy metadata (one msgpack-numpy frame); then each binary
frame from the client is an observation map and the reply is {"actions", "policy_timing", "server_timing"}; a text
frame from the server is an error, which `openpi_client.WebsocketClientPolicy.infer` raises. `GET /healthz` answers
200; `GET /stats` answers counters, batch sizes and memory as JSON. Beyond upstream:
  - decoding and input transforms run in worker threads and the model in its own thread, so the event loop keeps
    serving every other connection meanwhile;
  - dynamic batching (`max_batch` > 1): requests from different connections that are ready within `batch_window_ms`
    of each other run as one batched model call (`pi05_jax.serving.batching`); each reply's `server_timing` says
    `batch_size`, `queue_ms` (ready to batch start), `infer_ms` (the batch's model call) and `prompt_tokens` (the
    request's tokenized prompt: task text and state);
  - overload is explicit: past `max_queue` waiting requests, a request gets a "server busy" error frame at once;
  - with an API key, a handshake without `Authorization: Api-Key <key>` is refused with HTTP 401;
  - a bad request (undecodable, oversized, missing key, wrong shape or dtype) gets a text error frame and the
    connection stays open; only a frame over the transport cap (4x the request limit) closes it (code 1009);
  - an optional "noise" [horizon, action_dim] float key in a request fixes the flow-matching noise (replays).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import dataclasses
import hmac
import http
import json
import logging
import pathlib
import time
from collections.abc import Callable

import numpy as np
import websockets
import websockets.asyncio.server as ws_server
from websockets.protocol import State

from pi05_jax.observation import ObservationError
from pi05_jax.serving import wire
from pi05_jax.serving.batching import Batcher, ClientGone, ServerBusy

log = logging.getLogger(__name__)
NOISE_KEY = "noise"


@dataclasses.dataclass(frozen=True)
class ServerConfig:
    host: str = "127.0.0.1"
    port: int = 8000
    api_key: str | None = None
    max_request_bytes: int = 32 << 20  # larger requests get an error frame
    workers: int = 4  # threads decoding and transforming requests; the model runs in one thread of its own
    max_batch: int = 1  # rows per model call (1: one request at a time)
    batch_window_ms: float = 5.0  # how long a ready request waits for others to join its batch
    max_queue: int = 32  # waiting requests (being prepared or queued) past which a request is refused as busy

    def __post_init__(self):
        if self.max_batch < 1 or self.max_queue < 1 or self.batch_window_ms < 0 or self.workers < 1:
            raise ValueError(f"bad server config {self}: max_batch, max_queue and workers must be >= 1 and "
                             f"batch_window_ms >= 0")

    @property
    def transport_max_bytes(self) -> int:
        """Frames above this are refused by the websocket layer itself (connection closed, code 1009)."""
        return 4 * self.max_request_bytes + (1 << 20)


def device_memory() -> dict | None:
    """{"bytes_in_use", "peak_bytes_in_use"} of the first device, or None where the backend reports none (CPU)."""
    try:
        import jax

        raw = jax.local_devices()[0].memory_stats()
    except Exception:  # no JAX, or a backend without memory stats
        return None
    if not raw:
        return None
    return {k: int(raw[k]) for k in ("bytes_in_use", "peak_bytes_in_use") if k in raw} or None


def resident_bytes() -> int | None:
    """This process's resident set size (Linux), or None."""
    try:
        for line in pathlib.Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


class BadRequest(ValueError):
    """The client's fault; answered with an error frame."""


class PolicyServer:
    """Serves a runner (`pi05_jax.serving.batching.PolicyRunner`, or anything with its `metadata`, `noise_shape`,
    `prepare(raw, noise) -> row` and `run(rows) -> [reply map]`)."""

    def __init__(self, runner, config: ServerConfig):
        self.runner = runner
        self.config = config
        self._pool = concurrent.futures.ThreadPoolExecutor(max_workers=config.workers,
                                                           thread_name_prefix="pi05-prepare")
        self._metadata = wire.pack(runner.metadata)
        self.batcher = Batcher(runner.run, max_batch=config.max_batch, window_s=config.batch_window_ms / 1e3,
                               max_queue=config.max_queue, sizes=getattr(runner, "sizes", None),
                               idle_clients=lambda: self._connections - self._answering)
        self._connections = 0  # open websocket connections
        self._answering = 0  # requests between receipt and reply
        self.requests = 0
        self.errors = 0
        self.busy = 0

    # ---- handshake: health check and authorization ----
    def _process_request(self, connection: ws_server.ServerConnection, request):
        if request.path == "/healthz":
            return connection.respond(http.HTTPStatus.OK, "OK\n")
        key = self.config.api_key
        if key is not None:
            got = request.headers.get("Authorization") or ""
            if not hmac.compare_digest(got.encode(), f"Api-Key {key}".encode()):
                log.warning("refused %s: missing or wrong API key", connection.remote_address)
                return connection.respond(http.HTTPStatus.UNAUTHORIZED,
                                          "missing or wrong 'Authorization: Api-Key <key>' header\n")
        if request.path == "/stats":
            response = connection.respond(http.HTTPStatus.OK, json.dumps(self.stats()) + "\n")
            del response.headers["Content-Type"]
            response.headers["Content-Type"] = "application/json"
            return response
        return None

    def stats(self) -> dict:
        """`GET /stats` (behind the API key when there is one): counters, batch sizes and memory, so a load test
        or a soak can watch the server from outside."""
        return {
            "requests": self.requests, "errors": self.errors, "busy": self.busy, "dropped": self.batcher.dropped,
            "waiting": self.batcher.waiting,
            "devices": getattr(self.runner, "devices", 1),  # local devices each batch is sharded over
            "batches": {str(n): c for n, c in sorted(self.batcher.batches.items())},
            "device_memory": device_memory(), "rss_bytes": resident_bytes(),
            # requests that waited on a compile show here (None: the runner does not count them)
            "compiles_since_warmup": getattr(self.runner, "compiles_since_warmup", None),
        }

    # ---- one request ----
    def _decode(self, message) -> tuple[dict, np.ndarray | None]:
        if isinstance(message, str):
            raise BadRequest("expected a binary msgpack-numpy frame, got a text frame")
        if len(message) > self.config.max_request_bytes:
            raise BadRequest(f"request of {len(message)} bytes is over the limit of "
                             f"{self.config.max_request_bytes} bytes (--max-request-bytes)")
        try:
            obs = wire.unpack(message)
        except wire.FrameError as e:
            raise BadRequest(f"undecodable frame: {e}") from e
        if not isinstance(obs, dict):
            raise BadRequest(f"a request must be a map of observation keys, got {type(obs).__name__}")
        try:
            obs = wire.flatten(obs)
        except wire.FrameError as e:
            raise BadRequest(str(e)) from e
        noise = obs.pop(NOISE_KEY, None)
        if noise is not None:
            want = tuple(self.runner.noise_shape)
            noise = np.asarray(noise)
            if noise.dtype.kind != "f" or noise.shape != want or not np.all(np.isfinite(noise)):
                raise BadRequest(f"key 'noise' must be finite float32 {want}, got {noise.dtype} {noise.shape}")
        return obs, noise

    def _decode_and_prepare(self, message):
        """Worker thread: decoding a large frame and the input transforms both stay off the event loop."""
        obs, noise = self._decode(message)
        return self.runner.prepare(obs, noise)

    async def _answer(self, message, alive: Callable[[], bool]) -> dict | str:
        """The response map, or the text of an error frame."""
        self._answering += 1
        try:
            return await self._answer_one(message, alive)
        finally:
            self._answering -= 1

    async def _answer_one(self, message, alive: Callable[[], bool]) -> dict | str:
        t0 = time.monotonic()
        try:
            self.batcher.admit()
        except ServerBusy as e:
            self.busy += 1
            self.errors += 1
            log.warning("%s", e)
            return str(e)
        try:
            row = await asyncio.get_running_loop().run_in_executor(self._pool, self._decode_and_prepare, message)
        except (BadRequest, ObservationError, ValueError) as e:
            self.batcher.withdraw()
            self.errors += 1
            log.warning("bad request: %s", e)
            return f"bad request: {e}"
        except BaseException as e:  # the server outlives any one request (and a cancelled one is withdrawn)
            self.batcher.withdraw()
            if not isinstance(e, Exception):
                raise
            self.errors += 1
            log.exception("preparing a request failed")
            return f"internal error: {type(e).__name__}: {e}"
        prepared = time.monotonic()
        try:
            done = await self.batcher.submit(row, alive)
        except ClientGone as e:
            return f"dropped: {e}"
        except Exception as e:  # a failed batch: every row in it gets this, the server keeps serving
            self.errors += 1
            return f"internal error: {type(e).__name__}: {e}"
        result = done.reply
        result["server_timing"] = {
            "infer_ms": done.infer_s * 1e3, "queue_ms": done.queue_s * 1e3, "batch_size": done.batch_size,
            "executable_batch": done.executable_batch, "prepare_ms": (prepared - t0) * 1e3,
            "total_ms": (time.monotonic() - t0) * 1e3}
        tokens = getattr(row, "prompt_tokens", None)  # a stub runner's rows may not say
        if tokens is not None:
            result["server_timing"]["prompt_tokens"] = tokens
        return result

    async def _handler(self, websocket: ws_server.ServerConnection) -> None:
        peer = websocket.remote_address
        log.info("connection from %s opened", peer)

        def alive() -> bool:
            return websocket.state is State.OPEN

        self._connections += 1
        try:
            await websocket.send(self._metadata)
            prev_total = None
            while True:
                message = await websocket.recv()
                t0 = time.monotonic()
                reply = await self._answer(message, alive)
                if isinstance(reply, dict):
                    if prev_total is not None:
                        # As upstream: the previous request's receive-to-sent time.
                        reply["server_timing"]["prev_total_ms"] = prev_total * 1e3
                    try:
                        reply = wire.pack(reply)
                    except Exception as e:
                        log.exception("cannot encode the response")
                        reply = f"internal error: cannot encode the response ({type(e).__name__}: {e})"
                await websocket.send(reply)
                self.requests += 1
                prev_total = time.monotonic() - t0
        except websockets.ConnectionClosed as e:
            log.info("connection from %s closed (%s)", peer, e.rcvd.code if e.rcvd else "no close frame")
        finally:
            self._connections -= 1

    # ---- lifecycle ----
    async def serve(self, stop: asyncio.Event, ready: Callable[[str, int], None] | None = None) -> None:
        """Listen until `stop` is set, then close every connection (code 1001) and finish in-flight requests."""
        self.batcher.start()
        try:
            async with ws_server.serve(
                self._handler,
                self.config.host,
                self.config.port,
                compression=None,
                max_size=self.config.transport_max_bytes,
                process_request=self._process_request,
            ) as server:
                host, port = server.sockets[0].getsockname()[:2]
                if ready is not None:
                    ready(host, port)
                await stop.wait()
                log.info("shutting down: closing connections")
        finally:
            await self.batcher.stop()
            self._pool.shutdown(wait=True, cancel_futures=True)

    def summary(self) -> str:
        """One line for the end of a run: replies, errors, and the batch sizes the model ran."""
        sizes = ", ".join(f"{n} row{'s' if n > 1 else ''} x {c}" for n, c in sorted(self.batcher.batches.items()))
        return (f"{self.requests} replies ({self.errors} errors, {self.busy} refused as busy, "
                f"{self.batcher.dropped} dropped for a closed connection); batches: {sizes or 'none'}")
