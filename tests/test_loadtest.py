"""`pi05 loadtest` against an in-process PolicyServer with a stub runner (no model): real openpi clients, the report
(per-client latency, batch sizes, every error, exit status), synthetic requests built from the server's metadata,
and the loopback-only rule. tests/test_server.py runs it once against the real batching server."""

from __future__ import annotations

import json
import re
import threading

import numpy as np
import pytest

from pi05_jax.commands.common import UsageError
from pi05_jax.commands.loadtest import check_loopback, synthetic_requests
from tests.conftest import run_cli
from tests.test_server import StubServer

SHAPES = {"observation/image": [[96, 128, 3], "|u1"], "observation/state": [[8], "<f4"],
          "prompt": [[], "<U18"]}


class EchoRunner:
    """Stub runner: checks each request has the declared keys and shapes; a prompt of exactly 3 words is refused
    as bad input (so some requests of a run fail); actions are the number of prompt words."""

    def __init__(self):
        self.metadata = {"stub": True, "adapter": "stub", "max_batch": 4, "request_shapes": SHAPES}
        self.noise_shape = (50, 32)
        self.prompts: list[str] = []
        self.lock = threading.Lock()

    def prepare(self, raw, noise):
        from pi05_jax.policy.errors import PolicyInputError

        assert raw["observation/image"].shape == (96, 128, 3) and raw["observation/image"].dtype == np.uint8
        assert raw["observation/state"].shape == (8,) and raw["observation/state"].dtype == np.float32
        words = len(raw["prompt"].split())
        if words == 3:
            raise PolicyInputError("three words is bad luck")
        with self.lock:
            self.prompts.append(raw["prompt"])
        return words

    def run(self, rows):
        return [{"actions": np.full((50, 7), w, np.float32)} for w in rows]


@pytest.fixture
def stub_server():
    runner = EchoRunner()
    srv = StubServer(runner, max_batch=4, batch_window_ms=20)
    srv.runner = runner
    yield srv
    srv.close()


def test_loadtest_reports_latency_batches_and_every_error(stub_server, tmp_path):
    out = tmp_path / "r.json"
    code, stdout, stderr = run_cli(["loadtest", "--port", str(stub_server.port), "--clients", "3", "--rate", "50",
                                    "--requests", "12", "--duration", "30", "--stats-every", "0.2",
                                    "--output", str(out)])
    report = json.loads(out.read_text())
    # the synthetic prompts have 2..11 words: (client + index) % 10 == 1 gives 3 words, refused by the stub
    expected_errors = [(c, k) for c in range(3) for k in range(12) if (c + k) % 10 == 1]
    assert code == 1, stdout + stderr  # some requests failed
    assert report["sent"] == 36 and report["replies"] == 36 - len(expected_errors)
    assert len(report["errors"]) == len(expected_errors)
    for c, k in expected_errors:
        assert any(e.startswith(f"client {c} request {k}:") and "three words is bad luck" in e
                   for e in report["errors"])
    assert [c["replies"] for c in report["per_client"]] == [
        12 - sum(1 for cc, _ in expected_errors if cc == c) for c in range(3)]
    assert sum(report["batch_sizes"].values()) == report["replies"]
    assert all(1 <= int(b) <= 4 for b in report["batch_sizes"])
    lat = report["latency_ms"]
    assert 0 < lat["p50"] <= lat["p90"] <= lat["p99"]
    assert report["server_memory"]["samples"] >= 2 and report["server_memory"]["device_bytes_in_use"] is None
    assert len(set(stub_server.runner.prompts)) > 3  # the prompt varies between requests
    for line in ("throughput:", "batch sizes seen", f"errors: {len(expected_errors)}", "server memory over"):
        assert line in stdout
    assert re.search(r"^\s+all\s+36\s+\d+\s+\d+", stdout, re.M)


def test_loadtest_without_errors_exits_zero(stub_server):
    # client 0's requests 0 and 2 have 2 and 4 words (request 1 would have 3): --requests 1 sends only request 0
    code, stdout, _ = run_cli(["loadtest", "--port", str(stub_server.port), "--clients", "1", "--rate", "20",
                               "--requests", "1", "--duration", "10"])
    assert code == 0 and "errors: 0" in stdout and "throughput: " in stdout


@pytest.mark.parametrize("host", ["10.1.2.3", "192.168.0.10", "example.com", "0.0.0.0", "8.8.8.8"])
def test_loadtest_refuses_anything_but_loopback(host):
    with pytest.raises(UsageError, match="loopback only"):
        check_loopback(host)
    code, _, stderr = run_cli(["loadtest", "--host", host, "--port", "8000"])
    assert code == 2 and "loopback only" in stderr


@pytest.mark.parametrize("host", ["127.0.0.1", "127.0.0.2", "::1", "localhost"])
def test_loopback_hosts_are_accepted(host):
    check_loopback(host)


def test_no_server_is_a_clear_error():
    import socket

    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    code, _, stderr = run_cli(["loadtest", "--port", str(port), "--requests", "1"])
    assert code == 2 and f"no server at 127.0.0.1:{port}" in stderr


def test_synthetic_requests_follow_the_declared_shapes_and_vary():
    make = synthetic_requests({"request_shapes": SHAPES}, seed=0)
    a, b = make(0, 0), make(0, 1)
    assert a["observation/image"].shape == (96, 128, 3) and a["observation/image"].dtype == np.uint8
    assert a["observation/state"].dtype == np.float32 and isinstance(a["prompt"], str)
    assert a["prompt"] != b["prompt"] and not np.array_equal(a["observation/image"], b["observation/image"])
    with pytest.raises(UsageError, match="request_shapes"):
        synthetic_requests({"adapter": "libero"}, seed=0)


class WordsRow:
    """A stub row that says its prompt's token count, as `batching.Row` does."""

    def __init__(self, words: int):
        self.words = words
        self.prompt_tokens = 10 + words


class CountingRunner(EchoRunner):
    def prepare(self, raw, noise):
        super().prepare(raw, noise)
        return WordsRow(len(raw["prompt"].split()))

    def run(self, rows):
        return [{"actions": np.full((50, 7), r.words, np.float32)} for r in rows]


def test_closed_loop_with_fixed_prompt_words_reports_the_servers_prompt_tokens(tmp_path):
    runner = CountingRunner()
    srv = StubServer(runner, max_batch=4, batch_window_ms=5)
    try:
        out = tmp_path / "r.json"
        code, stdout, stderr = run_cli(["loadtest", "--port", str(srv.port), "--clients", "3", "--rate", "0",
                                        "--requests", "20", "--duration", "60", "--prompt-words", "7",
                                        "--output", str(out)])
    finally:
        srv.close()
    assert code == 0, stdout + stderr
    report = json.loads(out.read_text())
    assert report["rate_hz"] == 0 and report["replies"] == 60 and report["errors"] == []
    assert report["prompt_words"] == 7 and report["prompt_tokens"] == {"min": 17, "p50": 17.0, "max": 17}
    assert {len(p.split()) for p in runner.prompts} == {7}
    assert "closed loop (--rate 0)" in stdout and "prompt tokens (server_timing): min 17, median 17, max 17" in stdout


def test_prompt_words_and_rate_are_checked():
    assert synthetic_requests({"request_shapes": SHAPES}, seed=0, prompt_words=12)(3, 5)["prompt"].count(" ") == 11
    for argv, words in ((["--rate", "-1"], "--rate must be in [0, 1000]"),
                        (["--prompt-words", "0"], "--prompt-words must be in 1..1000")):
        code, _, stderr = run_cli(["loadtest", "--port", "8000", *argv])
        assert code == 2 and words in stderr, stderr
