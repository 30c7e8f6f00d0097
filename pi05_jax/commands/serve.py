"""`pi05 serve`: serve a pi0.5 checkpoint over openpi's websocket policy protocol.

Robots keep their openpi client (`openpi_client.websocket_client_policy.WebsocketClientPolicy`) unchanged: send raw
observations (camera frames, state, prompt) and get actions back. The model is loaded, compiled and warmed before the
port opens; SIGINT/SIGTERM close every connection and exit 0.
"""

from __future__ import annotations

import asyncio
import logging
import os
import pathlib
import signal
import sys

from pi05_jax.commands.common import Progress, UsageError, add_model_args, formatter, resolve_implementation

EPILOG = """\
The request keys depend on --adapter (docs/ROBOTS.md):
  libero  observation/image, observation/wrist_image (uint8 [H,W,3]), observation/state [8], prompt -> actions [50,7]
  droid   observation/exterior_image_1_left, observation/wrist_image_left, observation/joint_position [7],
          observation/gripper_position [1], prompt                                            -> actions [50,8]
  FILE.json  your robot's description (key mapping, which cameras exist, action dims)
A request may add "noise" float32 [50, 32] (horizon, model action dim) to fix the sampling noise.
Errors come back as a text frame (the openpi client raises them) and the connection stays usable.
Each reply's server_timing holds infer_ms, queue_ms, batch_size and prompt_tokens (docs/ROBOTS.md); GET /stats
answers counters, batch sizes and memory as JSON. Past --max-queue waiting requests a request gets "server busy" at
once.

By default a GPU runs 'pallas' in bfloat16 and the CPU 'compact' in float32 (see --kernels, --dtype); the startup
line says which run and why, the batch sizes compiled, what is warm and each size's warm latency.

examples:
  pi05 serve --checkpoint ckpt/pi05_libero --adapter libero --norm-stats physical-intelligence/libero \\
      --tokenizer ~/.cache/openpi/big_vision/paligemma_tokenizer.model
  pi05 serve --checkpoint ckpt/ --adapter my_robot.json --host 0.0.0.0 --port 8000 --api-key "$PI05_API_KEY"
  pi05 serve --checkpoint ckpt/ --adapter libero --vision tensorrt --vision-engine siglip_v2.plan,siglip_v3.plan
  pi05 serve --checkpoint ckpt/ --adapter libero --max-batch 8 --batch-window-ms 3   # a fleet on one GPU
  pi05 serve --checkpoint ckpt/ --adapter libero --devices all --max-batch 64         # 8 GPUs, 8 rows each
  pi05 loadtest --port 8000 --clients 8 --rate 5 --duration 60                        # then load it
  curl http://127.0.0.1:8000/healthz

  python -c "from openpi_client.websocket_client_policy import WebsocketClientPolicy as P; \\
      print(P('127.0.0.1', 8000).get_server_metadata())"
"""


def register(sub) -> None:
    from bridges.vision_bridge import add_vision_args

    p = sub.add_parser("serve", help="serve a checkpoint over openpi's websocket policy protocol",
                       description=__doc__, epilog=EPILOG, formatter_class=formatter())
    add_model_args(p)
    add_vision_args(p)
    p.add_argument("--adapter", required=True, metavar="NAME|FILE.json",
                   help="robot adapter: libero, droid, or a robot description JSON file (docs/ROBOTS.md)")
    p.add_argument("--norm-stats", default=None, metavar="ASSET_ID",
                   help="norm stats asset id under <checkpoint>/assets/ (default: the only one there)")
    p.add_argument("--tokenizer", default=None, metavar="PATH",
                   help="sentencepiece model (paligemma_tokenizer.model; default: <checkpoint>/tokenizer.model, "
                        "else openpi's cache)")
    p.add_argument("--host", default="127.0.0.1",
                   help="address to bind (default: %(default)s, this machine only; 0.0.0.0 for all interfaces)")
    p.add_argument("--port", type=int, default=8000, help="TCP port; 0 picks a free one (default: %(default)s)")
    p.add_argument("--api-key", default=os.environ.get("PI05_API_KEY"), metavar="KEY",
                   help="refuse connections without 'Authorization: Api-Key KEY' (default: $PI05_API_KEY, else none)")
    p.add_argument("--num-steps", type=int, default=10, metavar="N", help="Euler steps (default: %(default)s)")
    p.add_argument("--seed", type=int, default=0, help="seed of the sampling noise (default: %(default)s)")
    p.add_argument("--max-request-bytes", type=int, default=32 << 20, metavar="N",
                   help="larger requests get an error frame (default: %(default)s)")
    p.add_argument("--workers", type=int, default=4, metavar="N",
                   help="threads decoding and transforming requests (default: %(default)s)")
    p.add_argument("--max-batch", type=int, default=1, metavar="N",
                   help="dynamic batching: run up to N requests from different connections as one model call; "
                        "executables for batch sizes 1, 2, 4, ... and N are compiled before the port opens "
                        "(default: %(default)s, one request at a time)")
    p.add_argument("--batch-window-ms", type=float, default=5.0, metavar="MS",
                   help="how long a ready request waits for others to join its batch (only with --max-batch > 1; "
                        "skipped when every connected client already has its request in; default: %(default)s)")
    p.add_argument("--max-queue", type=int, default=32, metavar="N",
                   help="requests waiting (being prepared or queued for the model) past which a new request gets "
                        "a 'server busy' error frame at once (default: %(default)s)")
    p.add_argument("--devices", default="1", metavar="all|N",
                   help="data parallel over this many local devices ('all': every one JAX sees): the weights "
                        "replicated on each, every model call's batch sharded over them, each device running the "
                        "one-device program on its rows; the compiled batch sizes become N x 1, 2, 4, ... up to "
                        "ceil(--max-batch / N) per device, so give --max-batch >= N (default: %(default)s, one "
                        "device)")
    p.add_argument("--warm", choices=["all", "example"], default="all",
                   help="what to compile before the port opens, for every batch size: 'all' = every prefix bucket "
                        "any prompt length of this robot can need (no request ever compiles), 'example' = only the "
                        "warm-up request's (faster start; other prompt lengths compile on first use) "
                        "(default: %(default)s)")
    p.set_defaults(run=run)


def _check_args(args) -> None:
    if args.num_steps < 1:
        raise UsageError(f"--num-steps must be >= 1, got {args.num_steps}")
    if not 0 <= args.port <= 65535:
        raise UsageError(f"--port must be in 0..65535, got {args.port}")
    if args.max_request_bytes < 1024:
        raise UsageError(f"--max-request-bytes must be >= 1024, got {args.max_request_bytes}")
    if args.workers < 1:
        raise UsageError(f"--workers must be >= 1, got {args.workers}")
    if args.api_key is not None and not args.api_key.strip():
        raise UsageError("--api-key is empty")
    if args.max_batch < 1:
        raise UsageError(f"--max-batch must be >= 1, got {args.max_batch}")
    if not 0 <= args.batch_window_ms <= 1000:
        raise UsageError(f"--batch-window-ms must be in 0..1000, got {args.batch_window_ms}")
    if args.max_queue < 1:
        raise UsageError(f"--max-queue must be >= 1, got {args.max_queue}")
    text = str(args.devices).strip().lower()
    if text != "all" and not (text.isdigit() and int(text) >= 1):
        raise UsageError(f"--devices must be 'all' or a device count >= 1, got {args.devices!r}")


def devices_line(runner) -> str:
    """What the startup line says about devices: how many, and the batch each one runs per compiled size."""
    model = runner.model
    if model.mesh is None:
        return "1 device"
    n = runner.devices
    text = (f"{model.mesh.describe()}, data parallel (weights replicated, batch sharded): per-device batch "
            f"{[s // n for s in runner.sizes]} of compiled batch {list(runner.sizes)}")
    if runner.max_batch < n:
        text += f" (--max-batch {runner.max_batch} < {n} devices: some devices run only padding rows)"
    return text


def run(args) -> int:
    from bridges.vision_bridge import apply_vision_args, check_vision_args
    from checkpoints.openpi_io import read_config
    from pi05_jax.devices import DevicesError, parse_devices
    from pi05_jax.policy.pipeline import Policy, policy_parts
    from pi05_jax.policy.prompt_tokenizer import find_tokenizer
    from pi05_jax.runtime import Model
    from pi05_jax.serving.batching import PolicyRunner
    from pi05_jax.serving.server import PolicyServer, ServerConfig

    _check_args(args)
    check_vision_args(args)
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("pi05_jax").setLevel(logging.WARNING if args.quiet else logging.INFO)
    say = Progress(args.quiet)
    running = resolve_implementation(args)
    try:
        devices = parse_devices(args.devices)
    except DevicesError as e:
        raise UsageError(f"--devices: {e}") from e
    if devices > 1 and args.vision != "xla":
        raise UsageError(f"--vision {args.vision} runs its engine on one GPU; it cannot be combined with "
                         f"--devices {args.devices} ({devices} devices): use --vision xla, or --devices 1")
    checkpoint = pathlib.Path(args.checkpoint).expanduser().resolve()
    parts = policy_parts(checkpoint, config=read_config(checkpoint), adapter=args.adapter,
                         norm_stats=args.norm_stats, tokenizer=find_tokenizer(args.tokenizer, checkpoint))
    model = Model.load(checkpoint, dtype=args.dtype, kernels=args.kernels, progress=say, devices=devices)
    if apply_vision_args(args, model) != args.kernels:
        say(f"vision: {args.vision} engine(s) {args.vision_engine} (implementation {model.kernels})")
    say(f"model: {model.describe()}")
    policy = Policy(model=model, num_steps=args.num_steps, seed=args.seed, **parts)
    say(f"policy: adapter {policy.adapter.name}, norm stats {policy.norm_stats_path}, "
        f"tokenizer {policy.tokenizer.path}")
    runner = PolicyRunner(policy, max_batch=args.max_batch)
    if model.kernels == "megakernel" and args.max_batch > 1:
        say(f"note: megakernel runs a batch of B rows as B kernel launches per Euler step (each streams the expert's "
            f"weights again); for --max-batch {args.max_batch}, --kernels pallas streams them once per batch")
    say(f"compiling and warming up ({running}; vision {args.vision}, {args.num_steps} steps, "
        f"batch sizes {list(runner.sizes)}, {devices_line(runner)})")
    warm = runner.warmup(all_buckets=args.warm == "all", progress=say)
    say(f"warm in {warm.seconds:.1f} s")
    server = PolicyServer(runner, ServerConfig(host=args.host, port=args.port, api_key=args.api_key,
                                               max_request_bytes=args.max_request_bytes, workers=args.workers,
                                               max_batch=args.max_batch, batch_window_ms=args.batch_window_ms,
                                               max_queue=args.max_queue))
    batching = (f"batching up to {args.max_batch} requests within {args.batch_window_ms:g} ms"
                if args.max_batch > 1 else "one request per model call (--max-batch 1)")
    print(f"pi05 serve: {running}; {batching}, queue bound {args.max_queue}; {devices_line(runner)}; "
          f"{warm.describe()}", file=sys.stderr, flush=True)

    def ready(host, port):
        auth = "API key required" if args.api_key else "no API key"
        # One stable line that scripts (and the tests) wait for.
        print(f"pi05 serve: listening on ws://{host}:{port} ({auth}; health: http://{host}:{port}/healthz)",
              file=sys.stderr, flush=True)

    async def main():
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        await server.serve(stop, ready)

    try:
        asyncio.run(main())
    except OSError as e:
        raise UsageError(f"cannot listen on {args.host}:{args.port} ({e})") from e
    print(f"pi05 serve: stopped after {server.summary()}", file=sys.stderr, flush=True)
    return 0
