"""An openpi-compatible websocket policy server (openpi's `WebsocketPolicyServer` protocol) that stays up.

Protocol, as upstream: on connect the server sends the policy metadata (one msgpack-numpy frame); then each binary
frame from the client is an observation map and the reply is {"actions", "policy_timing", "server_timing"}; a text
frame from the server is an error, which `openpi_client.WebsocketClientPolicy.infer` raises. `GET /healthz` answers
200. Beyond upstream:
  - inference runs in worker threads, so the event loop keeps serving every other connection meanwhile;
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
import logging
import time
from collections.abc import Callable

import numpy as np
import websockets
import websockets.asyncio.server as ws_server

from pi05_jax.observation import ObservationError
from pi05_jax.serving import wire

log = logging.getLogger(__name__)
NOISE_KEY = "noise"


@dataclasses.dataclass(frozen=True)
class ServerConfig:
    host: str = "127.0.0.1"
    port: int = 8000
    api_key: str | None = None
    max_request_bytes: int = 32 << 20  # larger requests get an error frame
    workers: int = 4  # threads for transforms; model calls are serialized inside the Policy

    @property
    def transport_max_bytes(self) -> int:
        """Frames above this are refused by the websocket layer itself (connection closed, code 1009)."""
        return 4 * self.max_request_bytes + (1 << 20)


class BadRequest(ValueError):
    """The client's fault; answered with an error frame."""


class PolicyServer:
    def __init__(self, policy, config: ServerConfig):
        self.policy = policy
        self.config = config
        self._pool = concurrent.futures.ThreadPoolExecutor(max_workers=config.workers,
                                                           thread_name_prefix="pi05-infer")
        self._metadata = wire.pack(policy.metadata)
        self.requests = 0
        self.errors = 0

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
        return None

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
            cfg = self.policy.model.config
            want = (cfg.action_horizon, cfg.action_dim)
            noise = np.asarray(noise)
            if noise.dtype.kind != "f" or noise.shape != want or not np.all(np.isfinite(noise)):
                raise BadRequest(f"key 'noise' must be finite float32 {want}, got {noise.dtype} {noise.shape}")
        return obs, noise

    def _decode_and_infer(self, message) -> dict:
        """Worker thread: decoding a large frame and running the policy both stay off the event loop."""
        obs, noise = self._decode(message)
        return self.policy.infer(obs, noise=noise)

    async def _answer(self, message) -> dict | str:
        """The response map, or the text of an error frame."""
        try:
            t0 = time.monotonic()
            result = await asyncio.get_running_loop().run_in_executor(self._pool, self._decode_and_infer, message)
            infer_s = time.monotonic() - t0
        except (BadRequest, ObservationError, ValueError) as e:
            self.errors += 1
            log.warning("bad request: %s", e)
            return f"bad request: {e}"
        except Exception as e:  # the server outlives any one request
            self.errors += 1
            log.exception("inference failed")
            return f"internal error: {type(e).__name__}: {e}"
        result["server_timing"] = {"infer_ms": infer_s * 1e3}
        return result

    async def _handler(self, websocket: ws_server.ServerConnection) -> None:
        peer = websocket.remote_address
        log.info("connection from %s opened", peer)
        try:
            await websocket.send(self._metadata)
            prev_total = None
            while True:
                message = await websocket.recv()
                t0 = time.monotonic()
                reply = await self._answer(message)
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

    # ---- lifecycle ----
    async def serve(self, stop: asyncio.Event, ready: Callable[[str, int], None] | None = None) -> None:
        """Listen until `stop` is set, then close every connection (code 1001) and finish in-flight requests."""
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
        self._pool.shutdown(wait=True, cancel_futures=True)
