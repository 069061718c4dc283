"""The `tandem` command line."""

from __future__ import annotations

import argparse
import json
import logging
import signal
import sys
import threading
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

from tandem_serve.clients.triton import TextEmbeddingClient

if TYPE_CHECKING:
    from tandem_serve.clients.bulk import BulkOptions
    from tandem_serve.servers.server_process import ServerProcess
    from tandem_serve.triton.launcher import TritonOptions

logger = logging.getLogger("tandem_serve.cli")


def _add_server_options(parser: argparse.ArgumentParser, default_ports: tuple[int, int, int, int],
                        default_workspace: Path | None = None) -> None:
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1; 0.0.0.0 exposes the server)")
    parser.add_argument("--http-port", type=int, default=default_ports[0], help="0 picks a free port")
    parser.add_argument("--grpc-port", type=int, default=default_ports[1], help="0 picks a free port")
    parser.add_argument("--metrics-port", type=int, default=default_ports[2], help="0 picks a free port")
    parser.add_argument("--model-repository", action="append", type=Path, default=[],
                        help="a model repository (repeatable; default: the project's model_repository/ and ensembles/)")
    parser.add_argument("--workspace", type=Path, default=default_workspace,
                        help="directory for the backend copy, keys.json and server.log (kept)"
                             + (" (default %(default)s)" if default_workspace else "; default a temporary one"))
    parser.add_argument("--log-verbose", type=int, default=0, help="tritonserver --log-verbose level")
    parser.add_argument("--stub-pythonpath", action="append", type=Path, default=None,
                        help="directory put first on the Python-backend stubs' path only (repeatable), "
                             "e.g. one holding numpy<2; default $TANDEM_STUB_PYTHONPATH")
    parser.add_argument("--startup-timeout", type=float, default=300.0, help="seconds to wait for readiness")
    parser.add_argument("--health-port", type=int, default=default_ports[3],
                        help="the launcher's health endpoint: /live, /ready, /status (0 picks a free port)")
    parser.add_argument("--no-supervise", action="store_true",
                        help="do not reload models whose stubs die (model control then stays off)")
    parser.add_argument("--model-control", action="store_true",
                        help="explicit model control without supervision (supervision implies it); admin key required")
    parser.add_argument("--tritonserver", type=Path, metavar="DIR",
                        help="an installed Triton (the directory with bin/tritonserver and backends/, e.g. "
                             "/opt/tritonserver in the NGC image); default the embedded one (the [embedded] extra)")
    parser.add_argument("--exit-on-error", action="store_true",
                        help="stop the server when any model fails to load; by default such a model is refused "
                             "alone (logged, listed by the health endpoint) and the others serve")
    parser.add_argument("--key-file", type=Path, metavar="FILE",
                        help="use the keys in this keys.json (e.g. a mounted secret; `tandem keys FILE` writes one); "
                             "default fresh keys each start")


def _triton_options(args: argparse.Namespace) -> "TritonOptions":
    from tandem_serve.triton.launcher import TritonOptions

    return TritonOptions(
        model_repositories=args.model_repository, host=args.host, http_port=args.http_port,
        grpc_port=args.grpc_port, metrics_port=args.metrics_port, workspace=args.workspace,
        log_verbose=args.log_verbose, startup_timeout_s=args.startup_timeout, model_control=args.model_control,
        health_port=args.health_port, supervise=not args.no_supervise, tritonserver_home=args.tritonserver,
        keys_file=args.key_file, exit_on_error=args.exit_on_error,
        **({"stub_python_path": args.stub_pythonpath} if args.stub_pythonpath else {}),
    )


def cmd_serve_triton(args: argparse.Namespace) -> int:
    """Run the embedded Triton until Ctrl-C / SIGTERM."""
    from tandem_serve.triton.launcher import EmbeddedTriton

    if args.workspace is not None:
        args.workspace.mkdir(parents=True, exist_ok=True)
    return _serve_until_signal(EmbeddedTriton(_triton_options(args)), lambda server: [
        f"Triton ready: HTTP {server.http_url}  gRPC {server.grpc_url}  metrics port {server.metrics_port}"
        + (f"  health {server.health_url}/ready" if server.health_url else ""),
        f"Server log: {server.log_path}; keys for the restricted APIs (admin, shared memory): {server.keys_file}"])


def _serve_until_signal(server: "ServerProcess", banner: Callable[[Any], list[str]]) -> int:
    """Start `server`, print `banner(server)`, run until Ctrl-C / SIGTERM or until the server dies."""
    stop = threading.Event()
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, lambda *_: stop.set())
    with server:
        print("\n".join(banner(server)))
        print("Press Ctrl-C to stop.", flush=True)
        while not stop.wait(1.0):
            if not server.is_alive():
                logger.error("%s exited unexpectedly\n%s", server.name, server.log_tail())
                return 1
        logger.info("stopping %s", server.name)
    return 0


def cmd_repository_export(args: argparse.Namespace) -> int:
    """Write the project's models and ensembles as one model repository."""
    from tandem_serve.triton.repository import export_repository

    models = export_repository(args.directory, args.model_dir, args.weights, args.overwrite, args.head_format)
    print(f"wrote {len(models)} models to {args.directory}: {', '.join(models)}")
    print(f"serve it with: tritonserver --model-repository={args.directory.resolve()} (or tandem serve triton "
          f"--model-repository {args.directory})")
    return 0


def cmd_keys(args: argparse.Namespace) -> int:
    """Write a new keys.json (admin and shared-memory keys) for `--key-file` or a secret."""
    from tandem_serve.triton.keys import TritonKeys

    if args.file.exists() and not args.overwrite:
        raise ValueError(f"{args.file} exists; pass --overwrite to replace its keys")
    TritonKeys.generate().write(args.file)
    print(f"wrote new keys to {args.file} (mode 0600)")
    return 0


def cmd_archive(args: argparse.Namespace) -> int:
    from tandem_serve.torchserve.archive import build_archive

    overrides = {"handler": {"detector": {"head_format": args.head_format}}} if args.head_format else None
    for name in args.models:
        path = build_archive(name, args.store, args.model_dir, args.weights, args.format,
                             overrides if name == "object_detection" else None)
        print(f"archive: {path}", flush=True)
    return 0


def cmd_detector_export(args: argparse.Namespace) -> int:
    """Export a detector network (the shipped one, or weights the detector stage loads) as .pt2 or .onnx."""
    import torch

    from tandem_serve.stage_config import DetectorConfig
    from tandem_serve.vision.detector import load_detector
    from tandem_serve.vision.export import export_network

    config = DetectorConfig(weights=str(args.weights or ""), head_format=args.head_format, size=args.size,
                            num_classes=args.num_classes)
    config.validate()
    network = load_detector(config, torch.device("cpu"))
    if not isinstance(network, torch.nn.Module):
        raise SystemExit(f"{args.weights} is already an exported model")
    out = export_network(network, args.out, args.image_size, args.max_batch, compile_for=args.compile)
    print(f"wrote {out}: serve it with the detector parameters weights={out.name} head_format={args.head_format}")
    return 0


def cmd_serve_torchserve(args: argparse.Namespace) -> int:
    """Run TorchServe on the archives until Ctrl-C / SIGTERM, building missing archives first."""
    from tandem_serve.torchserve.archive import ARCHIVES, build_archive
    from tandem_serve.torchserve.launcher import EmbeddedTorchServe, TorchServeOptions, check_requirements

    check_requirements()
    args.store.mkdir(parents=True, exist_ok=True)
    for name in ARCHIVES:
        if not (args.store / f"{name}.mar").exists() and not (args.store / name).is_dir():
            print(f"building the missing archive {name} into {args.store}", flush=True)
            build_archive(name, args.store)
    args.workspace.mkdir(parents=True, exist_ok=True)
    options = TorchServeOptions(
        model_store=args.store, host=args.host, management_host=args.management_host,
        inference_port=args.inference_port, management_port=args.management_port,
        metrics_port=args.metrics_port, grpc_inference_port=args.grpc_inference_port,
        grpc_management_port=args.grpc_management_port, workspace=args.workspace, startup_timeout_s=args.startup_timeout,
        token_expiration_min=args.token_expiration_min, health_port=args.health_port, job_queue_size=args.job_queue_size,
    )
    return _serve_until_signal(EmbeddedTorchServe(options), lambda server: [
        f"TorchServe ready: inference {server.inference_url}  management {server.management_url}  "
        f"metrics {server.metrics_url}/metrics  health {server.health_url}/ready",
        f"Tokens (Authorization: Bearer <inference key>): {server.key_file}; logs: {server.workspace / 'logs'}"])


def cmd_demo(args: argparse.Namespace) -> int:
    from tandem_serve.demo import run_demo

    run_demo(_triton_options(args), annotated=args.out)
    return 0


def _check_shm(args: argparse.Namespace) -> None:
    if args.server == "torchserve" and args.shm != "none":
        raise ValueError("--shm applies to Triton only; TorchServe's REST API has no shared-memory protocol")


def _torchserve_key_file(args: argparse.Namespace) -> Path:
    from tandem_serve.torchserve.client import DEFAULT_WORKSPACE

    return args.key_file or DEFAULT_WORKSPACE / "key_file.json"


def _shm_key(args: argparse.Namespace) -> str | None:
    """The shared-memory key from --key-file (a Triton keys.json), else None (the default keys file's)."""
    from tandem_serve.triton.keys import TritonKeys

    return TritonKeys.read(args.key_file).shm if args.key_file else None


def cmd_infer_text(args: argparse.Namespace) -> int:
    _check_shm(args)
    if args.server == "torchserve":
        from tandem_serve.torchserve.client import TorchServeClient

        embeddings = TorchServeClient(args.url, _torchserve_key_file(args)).embed(args.text, model=args.model,
                                                                                  prompt_name=args.prompt_name)
    else:
        with TextEmbeddingClient(args.url, args.protocol, args.model, shm=args.shm, shm_key=_shm_key(args)) as client:
            embeddings = client.embed(args.text, prompt_name=args.prompt_name)
    for text, vector in zip(args.text, embeddings):
        if args.json:
            print(json.dumps({"text": text, "embedding": [round(float(v), 7) for v in vector]}, ensure_ascii=False))
        else:
            head = " ".join(f"{v:+.4f}" for v in vector[:6])
            print(f"{text[:40]!r}: dim {len(vector)}, norm {float((vector ** 2).sum()) ** 0.5:.4f}, [{head} ...]")
    return 0


def cmd_infer_image(args: argparse.Namespace) -> int:
    from tandem_serve.vision.draw import class_name, draw_detections

    _check_shm(args)
    data = args.file.read_bytes()
    if args.server == "torchserve":
        from tandem_serve.torchserve.client import TorchServeClient

        found = TorchServeClient(args.url, _torchserve_key_file(args)).detect(data, args.conf, args.iou, args.max_det,
                                                                              model=args.model)
    else:
        from tandem_serve.clients.triton import ObjectDetectionClient

        with ObjectDetectionClient(args.url, args.protocol, args.model, shm=args.shm, shm_key=_shm_key(args)) as client:
            found = client.detect(data, args.conf, args.iou, args.max_det)
    print(f"{args.file}: {len(found.boxes)} detection(s)")
    for box, score, cls in zip(found.boxes, found.scores, found.classes):
        print(f"  {class_name(int(cls)):<10} {score:.3f}  [{box[0]:.1f}, {box[1]:.1f}, {box[2]:.1f}, {box[3]:.1f}]")
    if args.out:
        print(f"annotated image: {draw_detections(data, found, args.out)}")
    return 0


def _bulk_options(args: argparse.Namespace) -> "BulkOptions":
    from tandem_serve.clients.bulk import BulkOptions

    return BulkOptions(url=args.url, protocol=args.protocol, shm=args.shm, in_flight=args.in_flight,
                       progress=not args.quiet, shm_key=_shm_key(args), retries=args.retries)


def cmd_embed(args: argparse.Namespace) -> int:
    from tandem_serve.clients.bulk import embed_file

    try:
        summary = embed_file(args.file, args.out, _bulk_options(args), args.model, args.batch, args.restart,
                             args.window)
    except KeyboardInterrupt:
        logger.warning("interrupted: rerun the same command to resume")
        return 130
    print(json.dumps({"out": str(args.out), **summary}))
    return 0 if summary["complete"] else 1


def cmd_detect(args: argparse.Namespace) -> int:
    from tandem_serve.clients.bulk import detect_folder

    try:
        summary = detect_folder(args.folder, args.out, _bulk_options(args), args.model, args.restart)
    except KeyboardInterrupt:
        logger.warning("interrupted: rerun the same command to resume")
        return 130
    print(json.dumps({"out": str(args.out), **summary}))
    return 0


def _add_bulk_options(parser: argparse.ArgumentParser, in_flight: int = 8) -> None:
    parser.add_argument("--protocol", choices=("grpc", "http"), default="grpc")
    parser.add_argument("--url", help="Triton address (default localhost:8001 for gRPC, localhost:8000 for HTTP)")
    parser.add_argument("--shm", choices=("none", "system", "cuda"), default="none", help="shared memory for each request")
    parser.add_argument("--in-flight", type=int, default=in_flight, help=f"concurrent requests (default {in_flight})")
    parser.add_argument("--retries", type=int, default=6,
                        help="times a request the server turned away as busy (a full queue, or queued past the model's "
                             "timeout: 10 s in the shipped configs) is sent again, after growing pauses (default 6)")
    parser.add_argument("--key-file", type=Path, help="with --shm: the server's keys.json "
                                                      "(default $TANDEM_TRITON_KEYS or the `tandem serve triton` workspace's)")
    parser.add_argument("--restart", action="store_true", help="start over instead of resuming")
    parser.add_argument("--quiet", action="store_true", help="no progress line")


def _add_client_options(parser: argparse.ArgumentParser) -> None:
    from tandem_serve.torchserve.client import DEFAULT_WORKSPACE

    parser.add_argument("--server", choices=("triton", "torchserve"), default="triton")
    parser.add_argument("--protocol", choices=("grpc", "http"), default="grpc", help="Triton's protocol")
    parser.add_argument("--url", help="server address (Triton: localhost:8001 gRPC / localhost:8000 HTTP; "
                                      "TorchServe: http://127.0.0.1:8080)")
    parser.add_argument("--key-file", type=Path,
                        help="TorchServe: its key_file.json (default: the `tandem serve torchserve` workspace's, "
                             f"{DEFAULT_WORKSPACE / 'key_file.json'}); Triton with --shm: its keys.json "
                             "(default $TANDEM_TRITON_KEYS or the `tandem serve triton` workspace's)")
    parser.add_argument("--shm", choices=("none", "system", "cuda"), default="none",
                        help="Triton: pass inputs and outputs through system or CUDA shared memory (same host)")


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("tandem-serve")
    except PackageNotFoundError:
        return "unknown (not installed)"


def build_parser() -> argparse.ArgumentParser:
    from tandem_serve.stage_config import HEAD_FORMATS
    from tandem_serve.torchserve.client import DEFAULT_WORKSPACE
    from tandem_serve.triton.keys import DEFAULT_WORKSPACE as DEFAULT_TRITON_WORKSPACE

    parser = argparse.ArgumentParser(prog="tandem", description="CPU and GPU stages in tandem inside Triton and TorchServe.")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    parser.add_argument("--version", action="version", version=f"%(prog)s {_version()}")
    commands = parser.add_subparsers(dest="command", required=True)

    serve = commands.add_parser("serve", help="start Triton or TorchServe on the project's models")
    servers = serve.add_subparsers(dest="server", required=True)
    triton = servers.add_parser("triton", help="Triton Inference Server: the embedded one (nvidia-pytriton's binary) "
                                               "or an installed one (--tritonserver)")
    _add_server_options(triton, (8000, 8001, 8002, 8003), DEFAULT_TRITON_WORKSPACE)
    triton.set_defaults(func=cmd_serve_triton)

    torchserve = servers.add_parser("torchserve", help="TorchServe on the tandem archives (needs Java 11+)")
    torchserve.add_argument("--store", type=Path, default=Path("model_store"), help="model store (missing archives are built)")
    torchserve.add_argument("--workspace", type=Path, default=DEFAULT_WORKSPACE,
                            help="config.properties, key_file.json, logs (default %(default)s)")
    torchserve.add_argument("--host", default="127.0.0.1", help="address of inference, metrics and health (default 127.0.0.1)")
    torchserve.add_argument("--management-host", default="127.0.0.1",
                            help="address of the management APIs (default 127.0.0.1, also when --host exposes inference)")
    for name, port in (("inference", 8080), ("management", 8081), ("metrics", 8082), ("grpc-inference", 7070),
                       ("grpc-management", 7071)):
        torchserve.add_argument(f"--{name}-port", type=int, default=port, help="0 picks a free port")
    torchserve.add_argument("--token-expiration-min", type=int, default=60, help="lifetime of the generated tokens")
    torchserve.add_argument("--health-port", type=int, default=8083,
                            help="the launcher's health endpoint: /live, /ready, /status, no token (0 picks a free port)")
    torchserve.add_argument("--startup-timeout", type=float, default=300.0, help="seconds to wait for ready workers")
    torchserve.add_argument("--job-queue-size", type=int, default=100,
                            help="requests queued per model before TorchServe answers 503 (default %(default)s, "
                                 "TorchServe's; the H200 text bench needed 2000 at 512 concurrent requests)")
    torchserve.set_defaults(func=cmd_serve_torchserve)

    repository = commands.add_parser("repository", help="the project's Triton model repository")
    repository_commands = repository.add_subparsers(dest="action", required=True)
    export = repository_commands.add_parser("export", help="write the models and ensembles as one repository, "
                                                           "for an image, a volume or KServe's /mnt/models")
    export.add_argument("directory", type=Path)
    export.add_argument("--model-dir", type=Path, help="sentence-transformers directory (BERT, RoBERTa, XLM-R, DistilBERT or MPNet) (default all-MiniLM-L6-v2)")
    export.add_argument("--weights", type=Path, help="detector weights, copied in (default the shipped shapes detector)")
    export.add_argument("--head-format", choices=HEAD_FORMATS,
                        help="what the detector given by --weights outputs (default the configs' yolov5)")
    export.add_argument("--overwrite", action="store_true", help="write into a non-empty directory")
    export.set_defaults(func=cmd_repository_export)

    detector = commands.add_parser("detector", help="detector networks")
    detector_commands = detector.add_subparsers(dest="action", required=True)
    detector_export = detector_commands.add_parser(
        "export", help="write a detector as a torch.export program (.pt2; --compile: AOTInductor) or ONNX (.onnx), by OUT's suffix; the "
                       "batch stays dynamic, the image size is fixed")
    detector_export.add_argument("out", type=Path)
    detector_export.add_argument("--weights", type=Path, help="a .safetensors or state-dict .pt (default the shipped "
                                                              "shapes detector)")
    detector_export.add_argument("--head-format", choices=("yolov5", "yolov8"), default="yolov5",
                                 help="the library network the weights are for (default %(default)s)")
    detector_export.add_argument("--size", default="", help="n/s/m/l/x, for a state dict without metadata")
    detector_export.add_argument("--num-classes", type=int, default=0, help="for a state dict without metadata")
    detector_export.add_argument("--image-size", type=int, default=640, help="the pipeline's image_size (default 640)")
    detector_export.add_argument("--max-batch", type=int, default=64, help="the largest batch (default 64)")
    detector_export.add_argument("--compile", metavar="DEVICE", help="a .pt2 compiled by AOTInductor for DEVICE (cpu, "
                                 "cuda:0): run this where the detector will serve (needs a C++ compiler there)")
    detector_export.set_defaults(func=cmd_detector_export)

    keys = commands.add_parser("keys", help="write a new keys.json for Triton's restricted APIs (admin, shared memory)")
    keys.add_argument("file", type=Path)
    keys.add_argument("--overwrite", action="store_true")
    keys.set_defaults(func=cmd_keys)

    archive = commands.add_parser("archive", help="build the TorchServe archives (.mar) with torch-model-archiver")
    archive.add_argument("--store", type=Path, default=Path("model_store"), help="where to write them (default %(default)s)")
    archive.add_argument("--models", nargs="+", default=["text_embedding", "object_detection"],
                         choices=("text_embedding", "object_detection"))
    archive.add_argument("--model-dir", type=Path, help="sentence-transformers directory (BERT, RoBERTa, XLM-R, DistilBERT or MPNet) (default all-MiniLM-L6-v2)")
    archive.add_argument("--weights", type=Path, help="detector weights (default the shipped shapes detector)")
    archive.add_argument("--head-format", choices=HEAD_FORMATS,
                         help="what the detector given by --weights outputs (default the handler's yolov5)")
    archive.add_argument("--format", choices=("mar", "dir"), default="mar", help="dir: an unzipped archive directory")
    archive.set_defaults(func=cmd_archive)

    demo = commands.add_parser("demo", help="start Triton, embed sentences, detect shapes in a generated image, report")
    _add_server_options(demo, (0, 0, 0, 0))
    demo.add_argument("--out", type=Path, default=Path("demo-detections.png"), help="annotated demo image (PNG)")
    demo.set_defaults(func=cmd_demo)

    infer = commands.add_parser("infer", help="send requests to a running server")
    kinds = infer.add_subparsers(dest="kind", required=True)
    text = kinds.add_parser("text", help="embed texts")
    text.add_argument("text", nargs="+", help="one or more texts")
    _add_client_options(text)
    text.add_argument("--model", default="text_embedding", help="text_embedding, text_embedding_fused or text_embedding_utf8 (Triton)")
    text.add_argument("--json", action="store_true", help="print full vectors as JSON lines")
    text.add_argument("--prompt-name", help="one of the model's prompts (config_sentence_transformers.json), e.g. query")
    text.set_defaults(func=cmd_infer_text)
    image = kinds.add_parser("image", help="detect objects in an image file (JPEG, PNG, ...)")
    image.add_argument("file", type=Path)
    _add_client_options(image)
    image.add_argument("--model", default="object_detection")
    image.add_argument("--out", type=Path, help="write the image with boxes drawn (PNG)")
    image.add_argument("--conf", type=float, help="confidence threshold for this request (server default 0.25)")
    image.add_argument("--iou", type=float, help="NMS IoU threshold for this request (server default 0.45)")
    image.add_argument("--max-det", type=int, help="most detections for this request (server default 300)")
    image.set_defaults(func=cmd_infer_image)
    embed = commands.add_parser("embed", help="embed every line of a text file into a .npy (memmap, resumable)")
    embed.add_argument("file", type=Path, help="UTF-8 text, one text per line (row i of the output = line i)")
    embed.add_argument("--out", type=Path, required=True, help="output .npy, float32 [lines, hidden]")
    embed.add_argument("--model", default="text_embedding")
    embed.add_argument("--batch", type=int, default=64,
                       help="texts per request (default 64, the shipped ensembles' max_batch_size; at most the model's)")
    embed.add_argument("--window", type=int, default=4096,
                       help="lines read at a time, sent in requests of texts of about the same length, written at once "
                            "and resumed as one (default 4096)")
    _add_bulk_options(embed, in_flight=16)
    embed.set_defaults(func=cmd_embed)

    detect = commands.add_parser("detect", help="detect objects in every image of a folder into JSON lines (resumable)")
    detect.add_argument("folder", type=Path)
    detect.add_argument("--out", type=Path, required=True, help="results, one JSON line per image")
    detect.add_argument("--model", default="object_detection")
    _add_bulk_options(detect)
    detect.set_defaults(func=cmd_detect)

    from tandem_serve.tuning.commands import add_commands

    add_commands(commands)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        return args.func(args)
    except KeyboardInterrupt:
        return 130
    except Exception as exc:  # noqa: BLE001 - one clear line instead of a traceback
        if args.verbose:
            raise
        logger.error("%s", exc)
        return 1


if __name__ == "__main__":
    sys.exit(main())
