"""Dynamic batching for `pi05 serve`: requests from different connections run as one batched model call.

Two parts:
  - `PolicyRunner` wraps a `pipeline.Policy`: `prepare` turns one raw request into a validated model row (worker
    threads, in parallel), `run` stacks rows into one batch, pads it up to the next batch size the server compiled
    (1, 2, 4, ... up to --max-batch; with --devices N, N times the per-device sizes 1, 2, 4, ..., the batch then
    sharded over the N devices), runs the model once and hands back each real row's actions. Padding rows are
    copies of the batch's first row: they change neither the batch's executable plan (the fast paths' plan is the
    max over rows of valid views and prefix length) nor any real row's numbers, and they never reach a reply.
  - `Batcher` (event loop side): a bounded queue of prepared rows and one loop that takes the first waiting row,
    waits up to the batch window for more (never longer than the window after that row was ready, and not at all
    when every connected client already has its request in), and runs the batch in the single model thread.
    While a batch runs, arriving rows queue up and form the next one.

Each row keeps its own views, prompt and noise: the batch axis is independent in every implementation (masked
rows and tokens are skipped exactly), so a batched row gets the actions it would get alone with the same noise.
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import contextlib
import dataclasses
import logging
import statistics
import time
from collections.abc import Callable, Mapping

import numpy as np

from pi05_jax.observation import Observation, check_noise, concat_observations, observation_from_arrays

log = logging.getLogger(__name__)


def batch_sizes(max_batch: int, devices: int = 1) -> tuple[int, ...]:
    """The batch sizes a server with this --max-batch compiles: powers of two below it, and max_batch itself.
    Over `devices` > 1 (the batch sharded over them) every size is a multiple of the device count: `devices` x the
    per-device sizes 1, 2, 4, ... up to ceil(max_batch / devices)."""
    if max_batch < 1:
        raise ValueError(f"max_batch must be >= 1, got {max_batch}")
    if devices < 1:
        raise ValueError(f"devices must be >= 1, got {devices}")
    per_device = -(-max_batch // devices)
    sizes, n = [], 1
    while n < per_device:
        sizes.append(n)
        n *= 2
    return tuple(devices * s for s in (*sizes, per_device))


def executable_batch(rows: int, sizes: tuple[int, ...]) -> int:
    """The smallest compiled batch size that holds `rows` (the batch is padded up to it)."""
    for size in sizes:
        if size >= rows:
            return size
    raise ValueError(f"a batch of {rows} rows is over the largest compiled batch size {sizes[-1]}")


@dataclasses.dataclass(frozen=True)
class Row:
    """One prepared request: a validated batch-1 observation and its noise [1, horizon, action_dim]."""

    obs: Observation
    noise: np.ndarray
    transform_s: float = 0.0
    prompt_tokens: int | None = None  # valid tokens of the tokenized prompt (task text + state), for server_timing


@dataclasses.dataclass(frozen=True)
class WarmReport:
    """What `PolicyRunner.warmup` compiled and how fast each batch size runs once warm."""

    executables: tuple  # compile_cache.ExecutableKey per compiled executable
    latency_ms: dict[int, float]  # batch size -> warm median latency of the example request's plan
    example_plan: object | None  # the warm-up request's plan (None: the implementation has none)
    all_buckets: bool  # every prefix bucket of the robot's views was compiled (else only the example's)
    seconds: float

    def describe(self) -> str:
        sizes = ", ".join(f"{b}: {ms:.1f} ms" for b, ms in self.latency_ms.items())
        plans = sorted({str(k.plan) for k in self.executables if k.plan is not None})
        if not plans:
            what = "one executable per batch size (this implementation has no prefix plan)"
        elif self.all_buckets:
            what = f"every prefix bucket of this robot's views ({len(plans)} plans) per batch size"
        else:
            what = f"only the warm-up request's plan {self.example_plan} per batch size; other prompt lengths " \
                   f"compile on first use"
        return f"{len(self.executables)} executables warm, {what}; warm latency by batch size {{{sizes}}}"


class PolicyRunner:
    """The server's view of a `pipeline.Policy`: per-request preparation and batched model calls."""

    def __init__(self, policy, *, max_batch: int = 1):
        self.policy = policy
        self.model = policy.model
        self.config = policy.model.config
        self.devices = getattr(self.model, "devices", 1)  # the batch of each call is sharded over these
        self.sizes = batch_sizes(max_batch, self.devices)
        self.max_batch = max_batch
        self.compiles_since_warmup: int | None = None  # XLA compilations in this process after `warmup`
        example = policy.example_request()
        self.metadata = {
            **policy.metadata,
            "max_batch": max_batch,
            "devices": self.devices,
            # lets a load generator build valid requests for any robot: raw key -> [shape, dtype]
            "request_shapes": {k: [list(np.shape(v)), np.asarray(v).dtype.str] for k, v in example.items()},
        }

    @property
    def noise_shape(self) -> tuple[int, int]:
        return (self.config.action_horizon, self.config.action_dim)

    def prepare(self, raw: Mapping[str, object], noise: np.ndarray | None) -> Row:
        """Worker thread: input transforms and validation of one request; bad input raises ObservationError."""
        t0 = time.perf_counter()
        inputs = self.policy.transform_inputs(raw)
        obs = observation_from_arrays({k: np.asarray(v)[None] for k, v in inputs.items()}, self.config,
                                      where="policy inputs")
        noise = self.policy.noise() if noise is None else noise
        noise = check_noise(np.asarray(noise)[None], 1, self.config)
        return Row(obs=obs, noise=noise, transform_s=time.perf_counter() - t0,
                   prompt_tokens=int(np.asarray(inputs["tokenized_prompt_mask"]).sum()))

    def sample(self, rows: list[Row]) -> np.ndarray:
        """Normalized actions [len(rows), horizon, action_dim] from one model call on the padded batch."""
        import jax

        size = executable_batch(len(rows), self.sizes)
        padded = rows + [rows[0]] * (size - len(rows))
        obs = concat_observations(r.obs for r in padded) if size > 1 else padded[0].obs
        noise = np.concatenate([r.noise for r in padded], axis=0)
        actions = self.model.sample(obs, noise=noise, num_steps=self.policy.num_steps)
        return np.asarray(jax.block_until_ready(actions))[: len(rows)]

    def run(self, rows: list[Row]) -> list[dict]:
        """Model thread: one batched call; each row's reply map (actions in the robot's dims, policy timing)."""
        t0 = time.perf_counter()
        normalized = self.sample(rows)
        t1 = time.perf_counter()
        out = []
        for row, actions in zip(rows, normalized, strict=True):
            t2 = time.perf_counter()
            robot = self.policy.transform_outputs(actions)
            out.append({"actions": robot, "policy_timing": {
                "infer_ms": (t1 - t0) * 1e3, "transform_ms": (row.transform_s + time.perf_counter() - t2) * 1e3}})
        return out

    def _count_compiles(self) -> None:
        """From now on count XLA compilations in this process (after warm-up, each is a request that waited)."""
        import jax

        from pi05_jax.compile_cache import BACKEND_COMPILE_EVENT

        if self.compiles_since_warmup is not None:
            return

        def listener(event: str, duration: float, **kwargs):
            del duration, kwargs
            if event == BACKEND_COMPILE_EVENT:
                self.compiles_since_warmup += 1

        self.compiles_since_warmup = 0
        jax.monitoring.register_event_duration_secs_listener(listener)

    def robot_views(self) -> int:
        return sum(1 for _, key in self.policy.adapter.views if key)

    def warmup(self, *, all_buckets: bool = True, runs: int = 3, progress: Callable[[str], None] | None = None
               ) -> WarmReport:
        """Compile every batch size's executables before the port opens, then time each warm.

        The robot's adapter fixes which views a request has, so the plans a request can need are this view count
        with every prefix bucket (one per prompt-length range); `all_buckets=False` compiles only the plan of the
        warm-up request (a faster start; other prompt lengths then compile on first use)."""
        from pi05_jax.compile_cache import deployment_observations, precompile

        t0 = time.perf_counter()
        example = self.prepare(self.policy.example_request(), None)
        prompt_len = int(np.asarray(example.obs.tokenized_prompt_mask).sum())
        common = dict(batch_sizes=self.sizes, views=(self.robot_views(),),
                      prompt_lens=None if all_buckets else (prompt_len,), num_steps=(self.policy.num_steps,))
        keys = precompile(self.model, progress=progress, **common)
        example_keys = deployment_observations(self.model, **{**common, "batch_sizes": (1,),
                                                              "prompt_lens": (prompt_len,)})
        latency = {}
        for size in self.sizes:
            rows = [example] * size
            actions = self.sample(rows)  # the example's plan: compiled above
            if not np.all(np.isfinite(actions)):
                raise RuntimeError(f"warm-up produced NaN/Inf actions at batch {size}: the checkpoint or the "
                                   f"kernels are broken")
            times = []
            for _ in range(max(1, runs)):
                t = time.perf_counter()
                self.sample(rows)
                times.append(time.perf_counter() - t)
            latency[size] = statistics.median(times) * 1e3
            if progress:
                progress(f"batch {size}: warm {latency[size]:.1f} ms")
        self.run([example])  # the whole reply path once (output transforms)
        self._count_compiles()
        return WarmReport(executables=tuple(keys), latency_ms=latency,
                          example_plan=next(iter(example_keys)).plan, all_buckets=all_buckets,
                          seconds=time.perf_counter() - t0)


class ServerBusy(RuntimeError):
    """The queue is full (--max-queue): answered at once with an error frame."""


class ClientGone(RuntimeError):
    """The request's connection closed before its batch ran; the row was dropped."""


@dataclasses.dataclass
class BatchReply:
    reply: dict
    batch_size: int  # real rows in the batch this request ran in
    executable_batch: int  # the compiled batch size it was padded up to
    queue_s: float  # from the request being prepared to its batch starting
    infer_s: float  # the batch's model call, output transforms included


@dataclasses.dataclass
class _Item:
    row: Row
    alive: Callable[[], bool]
    future: asyncio.Future
    ready_t: float


class Batcher:
    """Groups prepared rows into batched `run` calls on one model thread (see the module docstring).

    `waiting` counts admitted requests not yet in a model call (being prepared or queued); `admit` refuses past
    `max_queue`. Only the event loop's thread touches it."""

    def __init__(self, run: Callable[[list[Row]], list], *, max_batch: int, window_s: float, max_queue: int,
                 sizes: tuple[int, ...] | None = None, idle_clients: Callable[[], int] | None = None):
        if max_batch < 1 or max_queue < 1 or window_s < 0:
            raise ValueError(f"need max_batch >= 1, max_queue >= 1, window >= 0; got {max_batch}, {max_queue}, "
                             f"{window_s}")
        self._run = run
        # how many connected clients have no request in the server (they could still join a batch); None: unknown
        self._idle_clients = idle_clients
        self.max_batch = max_batch
        self.window_s = window_s
        self.max_queue = max_queue
        self.sizes = sizes or batch_sizes(max_batch)
        self.waiting = 0
        self.batches: collections.Counter[int] = collections.Counter()  # real rows per batch -> count
        self.dropped = 0  # rows whose client left before their batch
        self._queue: asyncio.Queue[_Item] | None = None
        self._model = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="pi05-model")
        self._task: asyncio.Task | None = None

    def start(self) -> None:
        self._queue = asyncio.Queue()
        self._task = asyncio.get_running_loop().create_task(self._loop(), name="pi05-batcher")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        while self._queue is not None and not self._queue.empty():
            item = self._queue.get_nowait()
            if not item.future.done():
                item.future.set_exception(ClientGone("the server is shutting down"))
        self._model.shutdown(wait=True, cancel_futures=True)

    def admit(self) -> None:
        """Count a new request in, or raise ServerBusy when `max_queue` requests already wait."""
        if self.waiting >= self.max_queue:
            raise ServerBusy(f"server busy: {self.waiting} requests are already waiting (--max-queue "
                             f"{self.max_queue}); retry later")
        self.waiting += 1

    def withdraw(self) -> None:
        """An admitted request that will not be submitted (its input was bad)."""
        self.waiting -= 1

    async def submit(self, row: Row, alive: Callable[[], bool] = lambda: True) -> BatchReply:
        """Queue an admitted row; returns its reply once its batch ran (raises ClientGone if it was dropped, or
        whatever the batch raised)."""
        item = _Item(row=row, alive=alive, future=asyncio.get_running_loop().create_future(),
                     ready_t=time.monotonic())
        self._queue.put_nowait(item)
        return await item.future

    def _nobody_else(self, collected: int) -> bool:
        """No request can join this batch within its window: none is being prepared or queued beyond the rows
        collected, and every connected client already has its request in (openpi clients send one at a time)."""
        if self._idle_clients is None:
            return False
        return self.waiting - collected <= 0 and self._idle_clients() <= 0

    async def _collect(self) -> list[_Item]:
        first = await self._queue.get()
        batch = [first]
        deadline = first.ready_t + self.window_s
        while len(batch) < self.max_batch:
            if not self._queue.empty():
                batch.append(self._queue.get_nowait())
                continue
            timeout = deadline - time.monotonic()
            if timeout <= 0 or self._nobody_else(len(batch)):
                break
            try:
                batch.append(await asyncio.wait_for(self._queue.get(), timeout))
            except TimeoutError:
                break
        return batch

    async def _loop(self) -> None:
        while True:
            items = await self._collect()
            self.waiting -= len(items)
            live = []
            for item in items:
                if item.future.done():  # its handler is gone (cancelled)
                    continue
                if item.alive():
                    live.append(item)
                else:
                    self.dropped += 1
                    item.future.set_exception(ClientGone("the client disconnected before its batch ran"))
            if live:
                await self._run_batch(live)

    async def _run_batch(self, live: list[_Item]) -> None:
        start = time.monotonic()
        try:
            replies = await asyncio.get_running_loop().run_in_executor(self._model, self._run, [i.row for i in live])
            if len(replies) != len(live):
                raise RuntimeError(f"the batch of {len(live)} rows returned {len(replies)} replies")
        except Exception as e:  # every row of a failed batch gets the error; the loop keeps serving
            log.exception("batch of %d rows failed", len(live))
            for item in live:
                if not item.future.done():
                    item.future.set_exception(e)
            return
        infer_s = time.monotonic() - start
        n = len(live)
        self.batches[n] += 1
        size = executable_batch(n, self.sizes)
        for item, reply in zip(live, replies, strict=True):
            if item.future.done():
                continue
            if isinstance(reply, BaseException):
                item.future.set_exception(reply)
            else:
                item.future.set_result(BatchReply(reply=reply, batch_size=n, executable_batch=size,
                                                  queue_s=start - item.ready_t, infer_s=infer_s))
