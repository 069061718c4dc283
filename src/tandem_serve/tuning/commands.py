"""The `tandem profile`, `tandem plan` and `tandem tune` commands."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from tandem_serve.tuning.torchserve_workers import DESIGN_CONCURRENCY, TorchServeCost

logger = logging.getLogger(__name__)


def cmd_profile(args: argparse.Namespace) -> int:
    from tandem_serve.tuning.plots import plot_profile
    from tandem_serve.tuning.profile import ProfileOptions, run_profile

    options = ProfileOptions(pipelines=tuple(args.pipelines), devices=tuple(args.devices or ()),
                             batch_sizes=tuple(args.batch_sizes), seq_lengths=tuple(args.seq_lengths),
                             image_sizes=tuple(args.image_sizes), detector_size=args.detector_size,
                             detector_weights=str(args.detector_weights or ""), head_format=args.head_format,
                             repeats=args.repeats, cpu_max_batch=args.cpu_max_batch,
                             model_dir=str(args.model_dir or ""), serving_cost=args.serving_cost)
    profile = run_profile(options)
    profile.save(args.out)
    print(f"profile: {args.out} ({len(profile.stages)} stage timings, {len(profile.transfers)} transfer timings)")
    plot = args.plot or args.out.with_suffix(".png")
    if plot_profile(profile, plot):
        print(f"plot: {plot}")
    return 0


def cmd_plan(args: argparse.Namespace) -> int:
    from tandem_serve.tuning.explain import format_report
    from tandem_serve.tuning.plan import Objective, make_plan
    from tandem_serve.tuning.profile import Profile
    from tandem_serve.triton.model_config import ensemble_problems
    from tandem_serve.tuning.render import render

    objective = Objective(p99_ms=args.p99_ms, min_accuracy=args.min_accuracy)
    sizes = {k: v for k, v in (("text", args.seq_length), ("detection", args.image_size)) if v}
    profile = Profile.load(args.profile)
    cost = TorchServeCost(request_ms=args.torchserve_request_ms, frontend_ms=args.torchserve_frontend_ms)
    try:
        cost.validate()
        if args.torchserve_concurrency < 1:
            raise ValueError(f"--torchserve-concurrency must be >= 1, got {args.torchserve_concurrency}")
    except ValueError as exc:
        logger.error("%s", exc)
        return 2
    report = make_plan(profile, objective, sizes, args.gpus, args.cpus, cost, args.torchserve_concurrency,
                       args.text_input)
    if not report.chosen:
        logger.error("%s holds no stage timings to plan from", args.profile)
        return 1
    print(format_report(report))
    if args.out:
        written = render(report, args.out, profile.models)
        for plan in report.chosen.values():
            problems = ensemble_problems(args.out / "triton", plan.ensemble)
            if problems:
                logger.error("rendered %s is inconsistent: %s", plan.ensemble, "; ".join(problems))
                return 1
        print(f"\nwrote {len(written)} config(s) and plan.json under {args.out}; serve them with\n"
              f"  tandem serve triton --model-repository {args.out / 'triton'}")
    return 0


def cmd_tune(args: argparse.Namespace) -> int:
    from tandem_serve.tuning.plots import plot_curves
    from tandem_serve.triton.keys import TritonKeys, default_keys_file
    from tandem_serve.tuning.tune import TuneOptions, Tuner, best_trial, format_trials, trials_json, write_best

    keys = TritonKeys.read(args.keys_file or default_keys_file())
    options = TuneOptions(args.url, args.ensemble, tuple(args.concurrency), args.seconds, args.rounds, args.p99_ms,
                          keys.admin, client_processes=args.client_processes, protocol=args.protocol,
                          http_url=args.http_url, shm=args.shm, shm_key=keys.shm)
    trials = Tuner(options).run()
    print(format_trials(trials))
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "tune.json").write_text(trials_json(trials))
        written = write_best(trials, args.out)
        print(f"wrote tune.json and {len(written)} config(s) under {args.out}")
        curves = {"before": trials[0].points, "after": best_trial(trials).points}
        if plot_curves({k: [(p.throughput, p.p99_ms) for p in v] for k, v in curves.items()},
                       args.out / "tune.png", f"tandem tune: {args.ensemble}"):
            print(f"plot: {args.out / 'tune.png'}")
    return 0


def add_commands(commands: argparse._SubParsersAction) -> None:
    """Register profile, plan and tune on the `tandem` parser."""
    from tandem_serve.stage_config import HEAD_FORMATS

    profile = commands.add_parser("profile", help="time every stage on every device/precision (JSON + PNG)")
    profile.add_argument("--out", type=Path, default=Path("profile.json"))
    profile.add_argument("--plot", type=Path, help="PNG (default: next to --out)")
    profile.add_argument("--pipelines", nargs="+", default=["text", "detection"], choices=("text", "detection"))
    profile.add_argument("--devices", nargs="+", help="default: cpu and every visible GPU")
    profile.add_argument("--batch-sizes", nargs="+", type=int, default=[1, 4, 16, 64])
    profile.add_argument("--seq-lengths", nargs="+", type=int, default=[32, 128], help="tokens per text")
    profile.add_argument("--image-sizes", nargs="+", type=int, default=[640], help="network input side (pixels)")
    profile.add_argument("--detector-size", default="", help="n/s/m/l/x: a random-weight YOLOv5 of that size")
    profile.add_argument("--detector-weights", type=Path,
                         help="your detector: any file the detector stage loads (.safetensors, .pt, .pt2, .onnx)")
    profile.add_argument("--head-format", default="yolov5", choices=HEAD_FORMATS,
                         help="what --detector-weights outputs (default %(default)s)")
    profile.add_argument("--repeats", type=int, default=5)
    profile.add_argument("--cpu-max-batch", type=int, default=16, help="largest batch timed on the CPU")
    profile.add_argument("--model-dir", type=Path, help="sentence-transformers model (default all-MiniLM-L6-v2)")
    profile.add_argument("--no-serving-cost", dest="serving_cost", action="store_false",
                         help="skip timing Triton's per-step costs on the embedded server (seconds)")
    profile.set_defaults(func=cmd_profile)

    plan = commands.add_parser("plan", help="choose placement, precision, instances and batching from a profile")
    plan.add_argument("profile", type=Path)
    plan.add_argument("--p99-ms", type=float, help="latency bound (default: maximum throughput)")
    plan.add_argument("--min-accuracy", type=float, default=0.99, help="accuracy floor vs fp32 (default 0.99)")
    plan.add_argument("--seq-length", type=int, help="plan for this many tokens per text (default the longest profiled)")
    plan.add_argument("--image-size", type=int, help="plan for this network input side (default the largest profiled)")
    plan.add_argument("--gpus", type=int, help="plan for N GPUs like the profiled one in one host: GPU stages get "
                      "instance groups on GPUs 0..N-1 (default the profiled machine's count)")
    plan.add_argument("--cpus", type=int, help="plan for N cores for the server (default the profiled machine's; "
                      "fewer where a load generator or other services share the host)")
    plan.add_argument("--torchserve-request-ms", type=float, default=TorchServeCost.request_ms,
                      help="a TorchServe worker's CPU per request beside the stages (frames, parsing, reply; default "
                      "%(default)s, measured on an H200 host): with the frontend's, it sets the workers rendered")
    plan.add_argument("--torchserve-frontend-ms", type=float, default=TorchServeCost.frontend_ms,
                      help="TorchServe's Java frontend CPU per request (default %(default)s, measured)")
    plan.add_argument("--torchserve-concurrency", type=int, default=DESIGN_CONCURRENCY,
                      help="requests in flight TorchServe's batches are sized for (default %(default)s): TorchServe "
                      "hands a free worker all it has queued up to batchSize, so batchSize is this over the workers")
    plan.add_argument("--text-input", choices=("bytes", "utf8"), default="bytes",
                      help="what text clients send: BYTES texts, any number per request (text_embedding, "
                      "text_embedding_fused; default), or one text per request as its UTF-8 bytes (text_embedding_utf8: "
                      "tokenized in the encoder's step, one step per request)")
    plan.add_argument("--out", type=Path, help="write Triton configs, TorchServe model-config.yaml and plan.json here")
    plan.set_defaults(func=cmd_plan)

    tune = commands.add_parser("tune", help="closed-loop tuning of an ensemble's stages on a running Triton")
    tune.add_argument("--url", default="localhost:8001", help="Triton gRPC address (server started with --model-control)")
    tune.add_argument("--ensemble", default="text_embedding")
    tune.add_argument("--keys-file", type=Path,
                      help="the server's keys.json (default $TANDEM_TRITON_KEYS or `tandem serve triton`'s; it prints the path)")
    tune.add_argument("--concurrency", nargs="+", type=int, default=[1, 4, 16])
    tune.add_argument("--seconds", type=float, default=5.0, help="per concurrency level")
    tune.add_argument("--rounds", type=int, default=4)
    tune.add_argument("--client-processes", type=int, default=1,
                      help="load processes (one sends a few thousand requests/s at most; see client cores in the log)")
    tune.add_argument("--protocol", choices=["grpc", "http"], default="grpc",
                      help="the load's protocol (configs are always read and loaded over gRPC, --url)")
    tune.add_argument("--http-url", default="localhost:8000", help="Triton HTTP address, for --protocol http")
    tune.add_argument("--shm", choices=["none", "system", "cuda"], default="none",
                      help="send inputs and read outputs through shared-memory regions (registered for the run)")
    tune.add_argument("--p99-ms", type=float)
    tune.add_argument("--out", type=Path, help="write the best configs (into existing model folders), tune.json, tune.png")
    tune.set_defaults(func=cmd_tune)


def _profile_main(argv: list[str] | None = None) -> int:
    """`python -m tandem_serve.tuning.commands OUT.json [profile options]`: profile without the full CLI's imports."""
    import sys

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    parser = argparse.ArgumentParser(prog="tandem-profile")
    add_commands(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["profile", "--out", *(argv if argv is not None else sys.argv[1:])])
    return args.func(args)


if __name__ == "__main__":
    raise SystemExit(_profile_main())
