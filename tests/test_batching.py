"""Dynamic batching (`pi05_jax.serving.batching`): batched rows equal their solo answers on the tiny reference model,
warm-up covers every executable a robot's requests can need, and the Batcher's queue semantics (window, max batch,
busy, a client gone, a failing row or batch) on stub runs."""

from __future__ import annotations

import asyncio
import functools

import numpy as np
import pytest

from pi05_jax.observation import ObservationError, concat_observations
from pi05_jax.serving import batching
from pi05_jax.serving.batching import Batcher, ClientGone, PolicyRunner, Row, ServerBusy
from pi05_jax.synthetic import synthetic_noise, synthetic_observation
from tests.conftest import REFERENCE_DIR, cosine, rel_err


def test_batch_sizes_are_powers_of_two_and_the_maximum():
    assert batching.batch_sizes(1) == (1,)
    assert batching.batch_sizes(4) == (1, 2, 4)
    assert batching.batch_sizes(6) == (1, 2, 4, 6)
    assert [batching.executable_batch(n, batching.batch_sizes(6)) for n in range(1, 7)] == [1, 2, 4, 4, 6, 6]
    with pytest.raises(ValueError, match="over the largest"):
        batching.executable_batch(7, batching.batch_sizes(6))
    with pytest.raises(ValueError):
        batching.batch_sizes(0)


@functools.cache
def _policy(kernels: str, dtype: str = "float32", num_steps: int = 1):
    from pi05_jax.policy.pipeline import build_policy
    from pi05_jax.runtime import Model

    model = Model.load(REFERENCE_DIR / "checkpoint", dtype=dtype, kernels=kernels)
    return build_policy(model, checkpoint=REFERENCE_DIR / "checkpoint", adapter="libero", norm_stats="libero",
                        tokenizer=str(REFERENCE_DIR / "tokenizer.model"), num_steps=num_steps)


# rows that differ in everything the fast paths specialise on: valid views (1, 3, 2) and prompt length (prefix
# buckets 320, 960 and 576 tokens alone), so the batch's plan (the max over rows) differs from every row's own
ROWS = ((1, 10), (3, 150), (2, 60))


def mixed_rows(config) -> list[Row]:
    return [Row(obs=synthetic_observation(config, views=v, prompt_len=t, seed=i),
                noise=synthetic_noise(config, seed=10 + i)) for i, (v, t) in enumerate(ROWS)]


def check_batched_equals_solo(kernels: str, dtype: str, metric) -> None:
    runner = PolicyRunner(_policy(kernels, dtype), max_batch=4)
    rows = mixed_rows(runner.config)
    batched = runner.sample(rows)  # 3 rows padded to the batch-4 executable
    assert batched.shape == (len(rows), runner.config.action_horizon, runner.config.action_dim)
    for i, row in enumerate(rows):
        alone = runner.sample([row])
        metric(batched[i], alone[0])
    # and a row's answer does not depend on its place in the batch or on its batch-mates (the same executable)
    reordered = runner.sample([rows[2], rows[0], rows[0], rows[1]])
    for got, want in zip(reordered, [batched[2], batched[0], batched[0], batched[1]], strict=True):
        metric(got, want)


@pytest.mark.parametrize("kernels", ["compact", "reference"])
def test_batched_rows_equal_their_solo_answers_float32(kernels):
    def within(a, b):
        assert rel_err(a, b) <= 1e-5

    check_batched_equals_solo(kernels, "float32", within)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_batched_rows_equal_their_solo_answers_pallas_on_the_card(dtype):
    def within(a, b):
        if dtype == "float32":
            assert rel_err(a, b) <= 1e-5
        else:
            assert cosine(a, b) >= 0.99999

    check_batched_equals_solo("pallas", dtype, within)


class _ModelOnly:
    """What PolicyRunner reads of a policy when only `sample` is called: the model and the step count."""

    def __init__(self, model, num_steps: int):
        self.model, self.num_steps, self.metadata = model, num_steps, {}

    @staticmethod
    def example_request() -> dict:
        return {}


def check_full_size_batched_equals_solo(preset_name: str, dtype: str, kernels: str, metric) -> None:
    """Random weights of the preset's architecture (bench's `random_weights`), packed for `kernels` as
    runtime.Model.load packs them; 10 steps. Four rows (2 views, prompts of 20, 40, 60 and 55 tokens: one prefix
    bucket, so two executables: batch 4 and batch 1), each with its own frames, prompt and noise, run as one batch
    through PolicyRunner.sample and then each alone."""
    import jax

    from pi05_jax import implementations, runtime
    from pi05_jax.bench.selection import random_weights
    from pi05_jax.config import preset

    config = preset(preset_name)
    impl = implementations.get(kernels)
    params = random_weights(config, seed=0, dtype=dtype)
    if impl.pack is not None:
        params = impl.pack(params, consume=True)
    model = runtime.Model(config=config, params=jax.block_until_ready(params), implementation=impl)
    runner = PolicyRunner(_ModelOnly(model, num_steps=10), max_batch=4)
    rows = [Row(obs=synthetic_observation(config, views=2, prompt_len=t, seed=i),
                noise=synthetic_noise(config, seed=20 + i)) for i, t in enumerate((20, 40, 60, 55))]
    batched = runner.sample(rows)
    assert np.all(np.isfinite(batched))
    for i, row in enumerate(rows):
        metric(batched[i], runner.sample([row])[0])


@pytest.mark.gpu
def test_full_size_batched_rows_equal_their_solo_answers_bf16_pallas_on_the_card():
    """The issue's claim at full size on the card: a request answered in a batch gets the actions it would get alone
    with the same noise, cosine >= 0.99999 in bfloat16 (pallas, the GPU default). The tiny model's float32 version of
    the same claim runs on the CPU in test_batched_rows_equal_their_solo_answers_float32."""
    def within(a, b):
        assert cosine(a, b) >= 0.99999, f"cosine {cosine(a, b):.7f}, relative error {rel_err(a, b):.2e}"

    check_full_size_batched_equals_solo("full", "bfloat16", "pallas", within)


def test_concat_observations_keeps_rows_and_refuses_mismatched_views():
    from pi05_jax.config import preset

    config = preset("tiny")
    a = synthetic_observation(config, views=1, prompt_len=5, seed=1)
    b = synthetic_observation(config, batch=2, views=3, prompt_len=7, seed=2)
    both = concat_observations([a, b])
    assert both.batch_size == 3
    np.testing.assert_array_equal(both.image_masks[config.image_keys[2]], [False, True, True])
    np.testing.assert_array_equal(both.tokenized_prompt_mask.sum(axis=1), [5, 7, 7])
    np.testing.assert_array_equal(both.images[config.image_keys[0]][1:], b.images[config.image_keys[0]])
    odd = type(b)(images={"other": b.images[config.image_keys[0]]}, image_masks={"other": b.image_masks[
        config.image_keys[0]]}, state=b.state, tokenized_prompt=b.tokenized_prompt,
        tokenized_prompt_mask=b.tokenized_prompt_mask)
    with pytest.raises(ObservationError, match="camera views"):
        concat_observations([a, odd])
    with pytest.raises(ObservationError, match="at least one"):
        concat_observations([])


def test_warmup_says_what_it_compiled_and_requests_inside_it_compile_nothing():
    """warmup(all_buckets=False) at max batch 2: the warm-up request's plan at batch 1 and 2, timed; requests in
    that plan compile nothing, a prompt in another prefix bucket compiles (as the report says), and the runner
    counts it. (The soak in tests/test_server.py checks that `--warm all` leaves no compile for any prompt.)"""
    policy = _policy("compact")
    runner = PolicyRunner(policy, max_batch=2)
    report = runner.warmup(all_buckets=False, runs=1)
    assert set(report.latency_ms) == {1, 2} and all(ms > 0 for ms in report.latency_ms.values())
    text = report.describe()
    assert f"only the warm-up request's plan {report.example_plan}" in text and "compile on first use" in text
    assert len(report.executables) == 2 and runner.compiles_since_warmup == 0
    example = policy.example_request()
    short = [runner.prepare({**example, "prompt": p}, None) for p in ("go", "pick up the red block")]
    runner.run(short[:1])
    runner.run(short)
    assert runner.compiles_since_warmup == 0
    long = runner.prepare({**example, "prompt": " ".join(["stack the cups and"] * 12)}, None)
    assert long.obs.tokenized_prompt_mask.sum() > short[1].obs.tokenized_prompt_mask.sum() + 64  # another bucket
    runner.run([long])
    assert runner.compiles_since_warmup >= 1


def test_prepare_refuses_bad_input_with_the_key():
    runner = PolicyRunner(_policy("compact"), max_batch=1)
    request = runner.policy.example_request()
    with pytest.raises(ObservationError, match="observation/state"):
        runner.prepare({**request, "observation/state": np.full(8, np.inf, np.float32)}, None)
    with pytest.raises(ObservationError, match="noise"):
        runner.prepare(request, np.zeros((50, 7), np.float32))


def test_prepare_counts_the_prompt_tokens():
    """Row.prompt_tokens (what a reply's server_timing says) is the tokenized prompt's valid length: BOS, the task
    text and the discretized state."""
    runner = PolicyRunner(_policy("compact"), max_batch=1)
    request = runner.policy.example_request()
    short, long = (runner.prepare({**request, "prompt": p}, None) for p in ("go", "pick up the red block " * 4))
    for row in (short, long):
        assert row.prompt_tokens == int(np.asarray(row.obs.tokenized_prompt_mask).sum())
    assert long.prompt_tokens > short.prompt_tokens + 10


# ---------------------------------------------------------------- the Batcher on stub runs (no model)


class Recorder:
    """A stub run: records the rows of every batch; a row "fail" gets its own error, "crash" fails the batch."""

    def __init__(self):
        self.batches: list[list] = []

    def __call__(self, rows):
        self.batches.append(list(rows))
        if "crash" in rows:
            raise RuntimeError("the accelerator fell over")
        return [ValueError(f"row {r} failed") if r == "fail" else {"row": r} for r in rows]


def run_async(coro):
    return asyncio.run(asyncio.wait_for(coro, 60))


async def _submit_all(batcher, rows, alive=None, gap_s=0.0):
    tasks = []
    for r in rows:
        batcher.admit()
        tasks.append(asyncio.ensure_future(batcher.submit(r, alive or (lambda: True))))
        if gap_s:
            await asyncio.sleep(gap_s)
    return await asyncio.gather(*tasks, return_exceptions=True)


def test_requests_within_the_window_share_one_batch_up_to_max_batch():
    record = Recorder()

    async def main():
        batcher = Batcher(record, max_batch=4, window_s=0.2, max_queue=16)
        batcher.start()
        out = await _submit_all(batcher, list("abcdef"))
        await batcher.stop()
        return out, batcher

    out, batcher = run_async(main())
    assert [sorted(b) for b in record.batches] == [list("abcd"), list("ef")]
    assert [o.reply["row"] for o in out] == list("abcdef")  # each reply goes to its own request
    assert [o.batch_size for o in out] == [4, 4, 4, 4, 2, 2]
    assert [o.executable_batch for o in out] == [4, 4, 4, 4, 2, 2]
    assert all(o.queue_s >= 0 and o.infer_s >= 0 for o in out)
    assert dict(batcher.batches) == {4: 1, 2: 1} and batcher.waiting == 0


def test_a_zero_window_does_not_wait_for_company():
    record = Recorder()

    async def main():
        batcher = Batcher(record, max_batch=4, window_s=0.0, max_queue=16)
        batcher.start()
        out = await _submit_all(batcher, list("abc"), gap_s=0.05)
        await batcher.stop()
        return out

    out = run_async(main())
    assert [o.batch_size for o in out] == [1, 1, 1] and len(record.batches) == 3


def test_past_max_queue_a_request_is_refused_at_once():
    async def main():
        batcher = Batcher(Recorder(), max_batch=2, window_s=0.0, max_queue=2)
        batcher.admit()
        batcher.admit()
        with pytest.raises(ServerBusy, match="server busy: 2 requests are already waiting"):
            batcher.admit()
        batcher.withdraw()  # one of them turned out malformed: room for another
        batcher.admit()
        assert batcher.waiting == 2

    run_async(main())


def test_a_client_gone_before_its_batch_costs_the_others_nothing():
    record = Recorder()
    gone = {"b"}

    async def main():
        batcher = Batcher(record, max_batch=4, window_s=0.1, max_queue=16)
        batcher.start()
        tasks = []
        for r in "abc":
            batcher.admit()
            tasks.append(asyncio.ensure_future(batcher.submit(r, lambda r=r: r not in gone)))
        out = await asyncio.gather(*tasks, return_exceptions=True)
        await batcher.stop()
        return out, batcher

    out, batcher = run_async(main())
    assert isinstance(out[1], ClientGone) and batcher.dropped == 1
    assert record.batches == [["a", "c"]]
    assert out[0].reply == {"row": "a"} and out[2].reply == {"row": "c"} and out[0].batch_size == 2


def test_a_failing_row_fails_alone_and_a_failing_batch_does_not_stop_the_loop():
    record = Recorder()

    async def main():
        batcher = Batcher(record, max_batch=3, window_s=0.1, max_queue=16)
        batcher.start()
        first = await _submit_all(batcher, ["a", "fail", "b"])
        second = await _submit_all(batcher, ["crash", "c"])
        third = await _submit_all(batcher, ["d"])
        await batcher.stop()
        return first, second, third

    first, second, third = run_async(main())
    assert first[0].reply == {"row": "a"} and first[2].reply == {"row": "b"}
    assert isinstance(first[1], ValueError) and "row fail failed" in str(first[1])
    assert all(isinstance(o, RuntimeError) and "fell over" in str(o) for o in second)
    assert third[0].reply == {"row": "d"}


@pytest.mark.parametrize("idle", [0, 1])
def test_the_window_is_skipped_only_when_no_other_client_could_join(idle):
    """With every connected client's request already in (idle clients 0) a batch starts at once; with one client
    that could still send, the first request waits out the window for it."""
    record = Recorder()
    window_s = 0.4

    async def main():
        batcher = Batcher(record, max_batch=4, window_s=window_s, max_queue=16, idle_clients=lambda: idle)
        batcher.start()
        t0 = asyncio.get_running_loop().time()
        out = await _submit_all(batcher, ["a"])
        waited = asyncio.get_running_loop().time() - t0
        await batcher.stop()
        return out, waited

    out, waited = run_async(main())
    assert out[0].reply == {"row": "a"}
    if idle:
        assert waited >= 0.9 * window_s
    else:
        assert waited < 0.5 * window_s
