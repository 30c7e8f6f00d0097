"""`pi05 loadtest`: drive a running policy server with N real openpi clients at R Hz each, on this machine.

Each client is `openpi_client.websocket_client_policy.WebsocketClientPolicy` on its own connection and thread,
sending one request every 1/R s (a robot's control loop: the next request leaves at its slot, or as soon as the
previous reply is in when the server is slower than R); --rate 0 is a closed loop: each client sends its next
request as soon as its previous reply is in (the server's capacity with N requests in flight). The run stops after
--requests per client or --duration s, whichever comes first. It prints throughput, latency p50/p90/p99 per client
and overall (send to reply, measured by the client), the server's batch sizes, queue/infer times and prompt token
counts from each reply's server_timing, and every error.
Exit status 1 when any request failed. Loopback only: it refuses to load a server on another host.
"""

from __future__ import annotations

import collections
import dataclasses
import ipaddress
import json
import pathlib
import socket
import sys
import threading
import time

import numpy as np

from pi05_jax.commands.common import UsageError, formatter

EPILOG = """\
Requests: by default built from the server's metadata (pi05 serve sends each request key's shape and dtype):
random frames and state, and a prompt whose length varies per request (so rows differ in prefix length), or of
exactly --prompt-words words (the server's replies say how many tokens each prompt made: "prompt tokens").
--request FILE.npz --case NAME sends a recorded raw observation instead (the policy_cases.npz layout:
<case>/in/<raw key>), e.g. for servers that send no shapes.

examples:
  pi05 serve --checkpoint ckpt/ --adapter libero --max-batch 8 &
  pi05 loadtest --port 8000 --clients 8 --rate 5 --duration 60
  pi05 loadtest --port 8000 --clients 4 --rate 10 --requests 100 --output report.json
  pi05 loadtest --port 8000 --clients 16 --rate 0 --requests 100000 --duration 20   # closed loop: capacity
  pi05 loadtest --port 8000 --clients 1 --request tests/reference/tiny_pi05/policy_cases.npz --case libero
"""

REPLY_TIMEOUT_S = 120.0  # a reply later than this counts as an error and ends that client


def register(sub) -> None:
    p = sub.add_parser("loadtest", help="drive a local policy server with N openpi clients at R Hz each",
                       description=__doc__, epilog=EPILOG, formatter_class=formatter())
    p.add_argument("--host", default="127.0.0.1", help="server address, loopback only (default: %(default)s)")
    p.add_argument("--port", type=int, default=8000, help="server port (default: %(default)s)")
    p.add_argument("--api-key", default=None, metavar="KEY", help="the server's API key, if it wants one")
    p.add_argument("--clients", type=int, default=4, metavar="N", help="concurrent clients (default: %(default)s)")
    p.add_argument("--rate", type=float, default=5.0, metavar="HZ",
                   help="requests per second per client; 0: closed loop, the next request as soon as the previous "
                        "reply is in (default: %(default)s)")
    p.add_argument("--requests", type=int, default=100, metavar="N",
                   help="at most this many requests per client (default: %(default)s)")
    p.add_argument("--duration", type=float, default=60.0, metavar="S",
                   help="stop sending after this many seconds (default: %(default)s)")
    p.add_argument("--request", default=None, metavar="FILE.npz", help="send this recorded raw observation")
    p.add_argument("--case", default=None, metavar="NAME", help="which case of --request")
    p.add_argument("--seed", type=int, default=0, help="seed of the synthetic requests (default: %(default)s)")
    p.add_argument("--prompt-words", type=int, default=None, metavar="N",
                   help="synthetic prompts of exactly N words (default: 2..11 words, varying per request)")
    p.add_argument("--stats-every", type=float, default=5.0, metavar="S",
                   help="sample the server's GET /stats (device memory, RSS) every S seconds (default: %(default)s)")
    p.add_argument("--output", default=None, metavar="FILE.json", help="also write the report as JSON")
    p.set_defaults(run=run)


def check_loopback(host: str) -> None:
    """Refuse anything but this machine: 'localhost' or a loopback address (never resolved through DNS)."""
    if host == "localhost":
        return
    try:
        address = ipaddress.ip_address(host.strip("[]"))
    except ValueError:
        raise UsageError(f"--host {host!r}: pi05 loadtest targets loopback only (127.0.0.1, ::1 or localhost); "
                         f"run it on the server's machine") from None
    if not address.is_loopback:
        raise UsageError(f"--host {host}: not a loopback address; pi05 loadtest targets loopback only "
                         f"(127.0.0.1, ::1 or localhost)")


def _check_args(args) -> None:
    check_loopback(args.host)
    if not 1 <= args.port <= 65535:
        raise UsageError(f"--port must be in 1..65535, got {args.port}")
    if not 1 <= args.clients <= 256:
        raise UsageError(f"--clients must be in 1..256, got {args.clients}")
    if not 0 <= args.rate <= 1000:
        raise UsageError(f"--rate must be in [0, 1000] Hz (0: closed loop), got {args.rate}")
    if args.requests < 1:
        raise UsageError(f"--requests must be >= 1, got {args.requests}")
    if not 0 < args.duration <= 24 * 3600:
        raise UsageError(f"--duration must be in (0, 86400] s, got {args.duration}")
    if (args.request is None) != (args.case is None):
        raise UsageError("--request and --case go together")
    if args.prompt_words is not None and not 1 <= args.prompt_words <= 1000:
        raise UsageError(f"--prompt-words must be in 1..1000, got {args.prompt_words}")
    if args.prompt_words is not None and args.request is not None:
        raise UsageError("--prompt-words shapes the synthetic requests; --request sends a recorded one")
    if not args.stats_every > 0:
        raise UsageError(f"--stats-every must be > 0, got {args.stats_every}")


def _reachable(host: str, port: int) -> None:
    try:
        with socket.create_connection((host, port), timeout=5):
            pass
    except OSError as e:
        raise UsageError(f"no server at {host}:{port} ({e}); start one with `pi05 serve`") from e


# ---------------------------------------------------------------------------------------------------- requests


PROMPT_WORDS = ("pick", "up", "the", "red", "block", "and", "place", "it", "in", "the", "bowl")


def synthetic_prompt(client: int, index: int, words: int | None = None) -> str:
    """2..11 words varying with (client, index), or exactly `words` words (the sentence repeated)."""
    if words is None:
        return " ".join(PROMPT_WORDS[: 2 + (client + index) % (len(PROMPT_WORDS) - 1)])
    return " ".join(PROMPT_WORDS[i % len(PROMPT_WORDS)] for i in range(words))


def synthetic_requests(metadata: dict, seed: int, prompt_words: int | None = None):
    """A function (client, index) -> request built from the server's "request_shapes" metadata: uint8 frames and
    float vectors of those shapes, a prompt whose length varies with the index (or of `prompt_words` words)."""
    shapes = metadata.get("request_shapes")
    if not isinstance(shapes, dict) or not shapes:
        raise UsageError("the server's metadata has no 'request_shapes' (not a pi05 serve server?): pass a recorded "
                         "observation with --request FILE.npz --case NAME")

    def make(client: int, index: int) -> dict:
        rng = np.random.default_rng([seed, client, index])
        request = {}
        for key, (shape, dtype) in shapes.items():
            dtype = np.dtype(dtype)
            if dtype.kind in "US":
                request[key] = synthetic_prompt(client, index, prompt_words)
            elif dtype == np.uint8:
                request[key] = rng.integers(0, 256, size=shape, dtype=np.uint8)
            elif dtype.kind == "f":
                request[key] = rng.uniform(-1, 1, size=shape).astype(dtype)
            else:
                request[key] = np.zeros(shape, dtype)
        return request

    return make


def recorded_request(path: str, case: str):
    from pi05_jax.commands.infer import load_case

    arrays = load_case(path, case)
    arrays.pop("num_steps", None)
    request = {k: (str(v) if v.dtype.kind in "US" and v.ndim == 0 else v) for k, v in arrays.items()}
    return lambda _client, _index: request


# ---------------------------------------------------------------------------------------------------- server stats


def fetch_stats(host: str, port: int, api_key: str | None) -> dict | None:
    """The server's GET /stats, or None when it has none (e.g. upstream openpi's server)."""
    import urllib.request

    request = urllib.request.Request(f"http://{host}:{port}/stats")
    if api_key:
        request.add_header("Authorization", f"Api-Key {api_key}")
    try:
        with urllib.request.urlopen(request, timeout=5) as r:
            body = json.loads(r.read())
    except Exception:
        return None
    return body if isinstance(body, dict) else None


class StatsSampler(threading.Thread):
    """Samples /stats every `every` seconds until stopped; `samples` holds (seconds since start, stats)."""

    def __init__(self, host, port, api_key, every: float):
        super().__init__(name="loadtest-stats", daemon=True)
        self.host, self.port, self.api_key, self.every = host, port, api_key, every
        self.samples: list[tuple[float, dict]] = []
        self.t0 = time.monotonic()
        self._done = threading.Event()

    def sample(self) -> None:
        stats = fetch_stats(self.host, self.port, self.api_key)
        if stats is not None:
            self.samples.append((time.monotonic() - self.t0, stats))

    def run(self) -> None:
        while not self._done.wait(self.every):
            self.sample()

    def finish(self) -> None:
        self._done.set()
        self.join(10)
        self.sample()


def memory_summary(samples: list[tuple[float, dict]]) -> dict:
    """Device memory in use and RSS over the samples: first, max and last (bytes), and the device peak."""
    def series(get):
        values = [v for v in (get(s) for _, s in samples) if v is not None]
        return {"first": values[0], "max": max(values), "last": values[-1]} if values else None

    return {
        "samples": len(samples),
        "device_bytes_in_use": series(lambda s: (s.get("device_memory") or {}).get("bytes_in_use")),
        "device_peak_bytes": series(lambda s: (s.get("device_memory") or {}).get("peak_bytes_in_use")),
        "rss_bytes": series(lambda s: s.get("rss_bytes")),
    }


# ---------------------------------------------------------------------------------------------------- clients


@dataclasses.dataclass
class ClientLog:
    latencies_ms: list[float] = dataclasses.field(default_factory=list)
    batch_sizes: list[int] = dataclasses.field(default_factory=list)
    queue_ms: list[float] = dataclasses.field(default_factory=list)
    infer_ms: list[float] = dataclasses.field(default_factory=list)
    prompt_tokens: list[int] = dataclasses.field(default_factory=list)
    errors: list[str] = dataclasses.field(default_factory=list)
    sent: int = 0
    first_s: float | None = None
    last_s: float | None = None


def _client_loop(index: int, policy, make_request, args, start: float, deadline: float, log: ClientLog) -> None:
    period = 1.0 / args.rate if args.rate > 0 else 0.0  # 0: closed loop, every slot is "now"
    for k in range(args.requests):
        slot = start + k * period
        now = time.monotonic()
        if slot > now:
            time.sleep(slot - now)
        if time.monotonic() >= deadline:
            break
        request = make_request(index, k)
        t0 = time.monotonic()
        log.sent += 1
        try:
            reply = policy.infer(request)
        except RuntimeError as e:  # an error frame from the server
            log.errors.append(f"client {index} request {k}: {str(e).splitlines()[-1]}")
            continue
        except Exception as e:  # the connection broke: this client stops
            log.errors.append(f"client {index} request {k}: {type(e).__name__}: {e}")
            break
        t1 = time.monotonic()
        log.first_s = t0 if log.first_s is None else log.first_s
        log.last_s = t1
        log.latencies_ms.append((t1 - t0) * 1e3)
        timing = reply.get("server_timing", {}) if isinstance(reply, dict) else {}
        if "batch_size" in timing:
            log.batch_sizes.append(int(timing["batch_size"]))
        if "prompt_tokens" in timing:
            log.prompt_tokens.append(int(timing["prompt_tokens"]))
        for key, out in (("queue_ms", log.queue_ms), ("infer_ms", log.infer_ms)):
            if key in timing:
                out.append(float(timing[key]))
        actions = reply.get("actions") if isinstance(reply, dict) else None
        if actions is None or not np.all(np.isfinite(actions)):
            log.errors.append(f"client {index} request {k}: reply without finite actions")


def percentiles(values) -> dict[str, float | None]:
    if not values:
        return {"p50": None, "p90": None, "p99": None}
    p50, p90, p99 = np.percentile(np.asarray(values, np.float64), [50, 90, 99])
    return {"p50": float(p50), "p90": float(p90), "p99": float(p99)}


def token_summary(values) -> dict | None:
    """min / median / max of the prompt token counts the server reported, or None when it reported none."""
    if not values:
        return None
    return {"min": int(min(values)), "p50": float(np.median(values)), "max": int(max(values))}


def rate_text(rate: float) -> str:
    return "closed loop (--rate 0)" if rate == 0 else f"{rate:g} Hz"


def _ms(v) -> str:
    return "-" if v is None else f"{v:.1f}"


def report(logs: list[ClientLog], wall_s: float, args, metadata: dict, samples=()) -> dict:
    every = [x for log in logs for x in log.latencies_ms]
    batches = collections.Counter(b for log in logs for b in log.batch_sizes)
    return {
        "target": f"ws://{args.host}:{args.port}", "clients": args.clients, "rate_hz": args.rate,
        "adapter": metadata.get("adapter"), "server_max_batch": metadata.get("max_batch"),
        "wall_s": wall_s, "sent": sum(log.sent for log in logs), "replies": len(every),
        "throughput_rps": len(every) / wall_s if wall_s > 0 else 0.0,
        "latency_ms": percentiles(every),
        "per_client": [{"sent": log.sent, "replies": len(log.latencies_ms), "errors": len(log.errors),
                        "latency_ms": percentiles(log.latencies_ms)} for log in logs],
        "batch_sizes": {str(k): v for k, v in sorted(batches.items())},
        "server_queue_ms": percentiles([x for log in logs for x in log.queue_ms]),
        "server_infer_ms": percentiles([x for log in logs for x in log.infer_ms]),
        "prompt_words": getattr(args, "prompt_words", None),
        "prompt_tokens": token_summary([x for log in logs for x in log.prompt_tokens]),
        "server_memory": memory_summary(list(samples)),
        "errors": [e for log in logs for e in log.errors],
    }


def print_report(r: dict) -> None:
    print(f"pi05 loadtest: {r['clients']} clients x {rate_text(r['rate_hz'])} against {r['target']} "
          f"(adapter {r['adapter']}, server max batch {r['server_max_batch']}), {r['wall_s']:.1f} s")
    print(f"{'client':>6} {'sent':>6} {'replies':>7} {'errors':>6} {'p50 ms':>8} {'p90 ms':>8} {'p99 ms':>8}")
    for i, c in enumerate(r["per_client"]):
        lat = c["latency_ms"]
        print(f"{i:>6} {c['sent']:>6} {c['replies']:>7} {c['errors']:>6} {_ms(lat['p50']):>8} "
              f"{_ms(lat['p90']):>8} {_ms(lat['p99']):>8}")
    lat = r["latency_ms"]
    print(f"{'all':>6} {r['sent']:>6} {r['replies']:>7} {len(r['errors']):>6} {_ms(lat['p50']):>8} "
          f"{_ms(lat['p90']):>8} {_ms(lat['p99']):>8}")
    print(f"throughput: {r['throughput_rps']:.2f} replies/s ({r['replies']} replies in {r['wall_s']:.1f} s)")
    sizes = ", ".join(f"{k} x {v}" for k, v in r["batch_sizes"].items())
    print(f"batch sizes seen (replies by the rows of the model call they ran in): {sizes or 'none reported'}")
    q, m = r["server_queue_ms"], r["server_infer_ms"]
    print(f"server queue ms p50 {_ms(q['p50'])} p99 {_ms(q['p99'])}; server infer ms p50 {_ms(m['p50'])} "
          f"p99 {_ms(m['p99'])}")
    t = r["prompt_tokens"]
    print("prompt tokens (server_timing): " + (f"min {t['min']}, median {t['p50']:g}, max {t['max']}" if t else
                                                "not reported"))
    mem = r["server_memory"]
    if not mem["samples"]:
        print("server memory: not reported (no GET /stats)")
    else:
        def mib(series):
            if series is None:
                return "not reported"
            first, most, last = (series[k] / 2**20 for k in ("first", "max", "last"))
            return f"{first:.0f} -> max {most:.0f} -> {last:.0f} MiB"

        print(f"server memory over {mem['samples']} samples: device in use {mib(mem['device_bytes_in_use'])}, "
              f"device peak {mib(mem['device_peak_bytes'])}, RSS {mib(mem['rss_bytes'])}")
    print(f"errors: {len(r['errors'])}")
    for e in r["errors"]:
        print(f"  {e}")


def run(args) -> int:
    from openpi_client.websocket_client_policy import WebsocketClientPolicy

    _check_args(args)
    _reachable(args.host, args.port)
    policies, logs = [], []
    try:
        for _ in range(args.clients):
            try:
                policies.append(WebsocketClientPolicy(args.host, args.port, api_key=args.api_key))
            except Exception as e:
                raise UsageError(f"cannot connect to ws://{args.host}:{args.port} ({type(e).__name__}: {e})") from e
        metadata = policies[0].get_server_metadata()
        if args.request is not None:
            make = recorded_request(args.request, args.case)
        else:
            make = synthetic_requests(metadata, args.seed, args.prompt_words)
        logs = [ClientLog() for _ in policies]
        stats = StatsSampler(args.host, args.port, args.api_key, args.stats_every)
        stats.sample()
        stats.start()
        start = time.monotonic() + 0.05
        deadline = start + args.duration
        threads = [threading.Thread(target=_client_loop, args=(i, p, make, args, start, deadline, logs[i]),
                                    name=f"loadtest-client-{i}", daemon=True) for i, p in enumerate(policies)]
        for t in threads:
            t.start()
        for i, t in enumerate(threads):
            t.join(max(0.0, deadline + REPLY_TIMEOUT_S - time.monotonic()))
            if t.is_alive():
                logs[i].errors.append(f"client {i}: no reply within {REPLY_TIMEOUT_S:.0f} s after the end of the run")
        wall = max([log.last_s for log in logs if log.last_s is not None], default=time.monotonic()) - start
        stats.finish()
    finally:
        for p in policies:
            p._ws.close()  # the client has no close(); its connection is this attribute
    r = report(logs, max(wall, 1e-9), args, metadata, stats.samples)
    print_report(r)
    if args.output:
        out = pathlib.Path(args.output)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(r, indent=2) + "\n")
        print(f"wrote {out}")
    sys.stdout.flush()
    return 1 if r["errors"] else 0
