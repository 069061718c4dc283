"""Bulk jobs through a running Triton: embed a text file into a .npy memmap, detect over a folder into JSONL.

Both keep many requests in flight (one client per worker thread), show progress, keep memory
flat however large the input (texts are streamed; each chunk of embeddings goes into its own
short-lived `numpy.memmap` window of the .npy file, so written pages never pile up in the
process) and resume after an interruption: rerun the same command
and only the missing work is done.
"""

from __future__ import annotations

import json
import logging
import sys
import threading
import time
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import numpy as np

from tandem_serve.client import ObjectDetectionClient, TextEmbeddingClient

logger = logging.getLogger(__name__)
IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff"}


@dataclass(frozen=True)
class BulkOptions:
    """Where the server is and how hard to drive it."""

    url: str | None = None
    protocol: str = "grpc"
    shm: str = "none"
    in_flight: int = 8  # concurrent requests (one client each)
    progress: bool = True
    shm_key: str | None = None  # the shared-memory API's key (None: the default keys file's)


class Progress:
    """A one-line progress report on stderr: done/total, rate, ETA (at most twice a second)."""

    def __init__(self, total: int, unit: str, enabled: bool = True, already: int = 0):
        self.total, self.unit, self.enabled = total, unit, enabled
        self.done = already
        self.start_done, self.start = already, time.monotonic()
        self._shown = 0.0
        self._lock = threading.Lock()

    def add(self, count: int) -> None:
        with self._lock:
            self.done += count
            now = time.monotonic()
            if self.enabled and (now - self._shown >= 0.5 or self.done >= self.total):
                self._shown = now
                self._render(now)

    def _render(self, now: float) -> None:
        rate = (self.done - self.start_done) / max(now - self.start, 1e-9)
        eta = (self.total - self.done) / rate if rate > 0 else float("inf")
        share = self.done / self.total if self.total else 1.0
        eta_text = f"{eta / 60:.1f} min" if eta != float("inf") else "?"
        sys.stderr.write(f"\r{self.done:,}/{self.total:,} {self.unit} ({share:.1%})  {rate:,.0f} {self.unit}/s  ETA {eta_text}   ")
        if self.done >= self.total:
            sys.stderr.write("\n")
        sys.stderr.flush()


def _run_bounded(tasks: Iterator[Callable[[], object]], workers: int, on_done: Callable[[Future], None]) -> None:
    """Run `tasks` on `workers` threads with at most 2 x workers queued; stop cleanly on Ctrl-C."""
    pending: set[Future] = set()
    with ThreadPoolExecutor(workers, thread_name_prefix="tandem-bulk") as pool:
        try:
            for task in tasks:
                while len(pending) >= 2 * workers:
                    finished, pending = wait(pending, return_when=FIRST_COMPLETED)
                    for future in finished:
                        on_done(future)
                pending.add(pool.submit(task))
            for future in pending:
                future.result()
                on_done(future)
            pending = set()
        except KeyboardInterrupt:
            for future in pending:
                future.cancel()
            for future in pending:
                if not future.cancelled():
                    try:
                        future.result()
                        on_done(future)
                    except Exception:  # noqa: BLE001 - recorded as not done; a rerun retries it
                        pass
            raise


class _ThreadClients:
    """One client per worker thread (tritonclient's HTTP client is not thread-safe); all closed at the end."""

    def __init__(self, make: Callable[[], object]):
        self.make, self.local, self.all, self.lock = make, threading.local(), [], threading.Lock()

    def get(self):
        if not hasattr(self.local, "client"):
            self.local.client = self.make()
            with self.lock:
                self.all.append(self.local.client)
        return self.local.client

    def close(self) -> None:
        for client in self.all:
            client.close()


def count_lines(path: Path) -> int:
    """Lines in a text file (a last line without newline counts), read in 1 MiB blocks."""
    lines, last = 0, b"\n"
    with open(path, "rb") as handle:
        while block := handle.read(1 << 20):
            lines += block.count(b"\n")
            last = block[-1:]
    return lines + (last != b"\n")


def _chunks(path: Path, size: int) -> Iterator[tuple[int, list[bytes]]]:
    """(chunk index, lines without their newline) for consecutive groups of `size` lines."""
    with open(path, "rb") as handle:
        chunk: list[bytes] = []
        index = 0
        for line in handle:
            chunk.append(line.rstrip(b"\r\n"))
            if len(chunk) == size:
                yield index, chunk
                index, chunk = index + 1, []
        if chunk:
            yield index, chunk


class NpyRows:
    """Row-range writes into an existing 2-D .npy file, each through a memmap window that is flushed and dropped."""

    def __init__(self, path: Path):
        with path.open("rb") as handle:
            version = np.lib.format.read_magic(handle)
            read_header = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
            shape, fortran, dtype = read_header(handle)
            self.offset = handle.tell()
        if fortran or len(shape) != 2:
            raise ValueError(f"{path} is not a C-ordered 2-D array")
        self.path, self.shape, self.dtype = path, shape, dtype

    def write(self, start: int, rows: np.ndarray) -> None:
        """Rows [start, start + len(rows)) := rows."""
        window = np.memmap(self.path, self.dtype, mode="r+", shape=(len(rows), self.shape[1]),
                           offset=self.offset + start * self.shape[1] * self.dtype.itemsize)
        window[:] = rows
        window.flush()
        del window  # unmapped: the page cache keeps the data, the process's RSS does not


def embed_file(source: Path, out: Path, options: BulkOptions, model: str = "text_embedding", batch: int = 32,
               restart: bool = False) -> dict:
    """Embed every line of `source` (row i = line i) into the .npy file `out`; returns a summary."""
    total = count_lines(source)
    with TextEmbeddingClient(options.url, options.protocol, model) as probe:
        hidden = _output_width(probe, "embedding")
    batch = min(batch, probe.max_batch_size)
    chunks = -(-total // batch)
    state_path = out.with_name(out.name + ".done")
    meta_path = out.with_name(out.name + ".json")
    meta = {"source": str(source.resolve()), "lines": total, "hidden": hidden, "batch": batch, "model": model}
    resuming = not restart and out.exists() and state_path.exists() and meta_path.exists()
    if resuming and json.loads(meta_path.read_text()) != meta:
        raise ValueError(f"{out} belongs to another job ({meta_path}); pass --restart to start over")
    if not resuming:
        meta_path.write_text(json.dumps(meta))
        np.lib.format.open_memmap(out, mode="w+", dtype=np.float32, shape=(total, hidden)).flush()
        np.memmap(state_path, np.uint8, mode="w+", shape=(max(chunks, 1),)).flush()
    embeddings = NpyRows(out)
    done = np.memmap(state_path, np.uint8, mode="r+", shape=(max(chunks, 1),))
    left = chunks - int(done[:chunks].sum())
    if resuming:
        logger.info("resuming %s: %d of %d chunk(s) left", out, left, chunks)
    progress = Progress(total, "texts", options.progress, already=min(total, int(done[:chunks].sum()) * batch))
    clients = _ThreadClients(lambda: TextEmbeddingClient(options.url, options.protocol, model, shm=options.shm,
                                                                 shm_key=options.shm_key))
    failures: list[str] = []

    def task(index: int, lines: list[bytes]) -> Callable[[], tuple[int, int]]:
        def run() -> tuple[int, int]:
            rows = clients.get().embed(lines)
            embeddings.write(index * batch, rows)
            return index, len(lines)
        return run

    def on_done(future: Future) -> None:
        try:
            index, count = future.result()
        except Exception as exc:  # noqa: BLE001 - a failed chunk stays undone; a rerun retries it
            failures.append(str(exc).splitlines()[0][:200])
            return
        done[index] = 1
        progress.add(count)

    try:
        _run_bounded((task(i, lines) for i, lines in _chunks(source, batch) if not done[i]), options.in_flight, on_done)
    finally:
        done.flush()
        clients.close()
    complete = int(done[:chunks].sum()) == chunks
    summary = {"texts": total, "hidden": hidden, "chunks": chunks, "failed_chunks": len(failures), "complete": complete}
    if failures:
        logger.error("%d chunk(s) failed (rerun to retry them); first: %s", len(failures), failures[0])
    if complete:
        state_path.unlink(missing_ok=True)
        meta_path.unlink(missing_ok=True)
    return summary


def _output_width(client: TextEmbeddingClient, name: str) -> int:
    metadata = client.client.get_model_metadata(client.model)
    outputs = metadata.outputs if client.protocol == "grpc" else metadata["outputs"]
    for output in outputs:
        output_name = output.name if client.protocol == "grpc" else output["name"]
        if output_name == name:
            shape = list(output.shape if client.protocol == "grpc" else output["shape"])
            return int(shape[-1])
    raise ValueError(f"model {client.model} has no output {name!r}")


def image_files(folder: Path) -> list[Path]:
    """Image files under `folder` (recursive), in a stable order."""
    return sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)


def detect_folder(folder: Path, out: Path, options: BulkOptions, model: str = "object_detection",
                  restart: bool = False) -> dict:
    """One JSON line per image in `out` ({"file", "boxes", "scores", "classes"} or {"file", "error"}); resumable."""
    files = image_files(folder)
    if restart:
        out.unlink(missing_ok=True)
    kept = [r for r in _records(out) if "error" not in r] if out.exists() else []
    out.write_text("".join(json.dumps(r) + "\n" for r in kept), encoding="utf-8")  # failed images are retried
    finished = {r["file"] for r in kept}
    if kept:
        logger.info("resuming %s: %d of %d image(s) already done", out, len(finished), len(files))
    todo = [f for f in files if _rel(f, folder) not in finished]
    progress = Progress(len(files), "images", options.progress, already=len(files) - len(todo))
    clients = _ThreadClients(lambda: ObjectDetectionClient(options.url, options.protocol, model, shm=options.shm,
                                                                   shm_key=options.shm_key))
    lock = threading.Lock()
    counts = {"images": len(files), "detected": 0, "errors": 0}

    with open(out, "a", encoding="utf-8") as sink:
        def task(path: Path) -> Callable[[], dict]:
            def run() -> dict:
                name = _rel(path, folder)
                try:
                    found = clients.get().detect(path.read_bytes())
                except Exception as exc:  # noqa: BLE001 - recorded per image
                    message = exc.message() if hasattr(exc, "message") else str(exc)
                    return {"file": name, "error": str(message).splitlines()[0][:300]}
                return {"file": name, "boxes": found.boxes.round(2).tolist(), "scores": found.scores.round(4).tolist(),
                        "classes": found.classes.tolist()}
            return run

        def on_done(future: Future) -> None:
            record = future.result()
            with lock:
                sink.write(json.dumps(record) + "\n")
                sink.flush()
                counts["errors" if "error" in record else "detected"] += 1
            progress.add(1)

        try:
            _run_bounded((task(f) for f in todo), options.in_flight, on_done)
        finally:
            clients.close()
    return counts


def _rel(path: Path, folder: Path) -> str:
    return str(path.relative_to(folder))


def _records(path: Path) -> list[dict]:
    """The complete JSON lines of a results file (a line cut by an interruption is dropped)."""
    records = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            records.append(json.loads(line))
        except ValueError:
            pass
    return records
