"""Bulk jobs through a running Triton: embed a text file into a .npy memmap, detect over a folder into JSONL.

Both keep many requests in flight (one client per worker thread), show progress, keep memory
flat however large the input (texts are streamed in windows; a window's embeddings are written
into the .npy with `os.pwrite`, never mapped, so written pages do not pile up in the process)
and resume after an interruption: rerun the same command and only the missing work is done.
`embed_file` sends each window's texts in requests of about the same length, as
sentence-transformers' `encode` sorts its input: a request pads to its longest text.
"""

from __future__ import annotations

import functools
import json
import logging
import os
import random
import sys
import threading
import time
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, TypeVar

import numpy as np
from tqdm import tqdm

from tandem_serve.clients.triton import ObjectDetectionClient, TextEmbeddingClient

logger = logging.getLogger(__name__)
T = TypeVar("T")
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
    retries: int = 6  # a request turned away as busy is sent again up to this many times (see `with_retries`)


def progress_bar(total: int, unit: str, enabled: bool = True, already: int = 0) -> tqdm:
    """tqdm on stderr (count, rate, ETA): redrawn twice a second on a terminal, once every 30 s into a log."""
    terminal = sys.stderr.isatty()
    return tqdm(total=total, initial=already, unit=f" {unit}", disable=not enabled, file=sys.stderr,
                mininterval=0.5 if terminal else 30.0, dynamic_ncols=terminal, ascii=not terminal)


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
                on_done(future)  # it reads the result: a task's error is on_done's to record or raise
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


BUSY_MESSAGES = ("Request timeout expired", "Exceeds maximum queue size")  # Triton's queue policy turning one away


def error_text(exc: BaseException) -> str:
    """The server's message of a tritonclient error (its `message()`, without the status), else the exception's text."""
    return str(exc.message() if callable(getattr(exc, "message", None)) else exc)


def is_busy(exc: BaseException) -> bool:
    """Whether the server turned a request away for load (its queue full, or the request queued past the model's
    timeout): nothing was computed, and the same request may succeed later."""
    return any(text in error_text(exc) for text in BUSY_MESSAGES)


def with_retries(call: Callable[[], T], retries: int, pause_s: float = 0.25, most_s: float = 8.0,
                 on_retry: Callable[[], None] | None = None) -> T:
    """`call()`, sent again up to `retries` times while the server says it is busy, after pauses growing from `pause_s`
    to `most_s` (with jitter, so that turned-away requests do not come back together); `on_retry` is told each time."""
    for attempt in range(retries + 1):
        try:
            return call()
        except Exception as exc:  # noqa: BLE001 - only load is retried; anything else is the caller's
            if attempt == retries or not is_busy(exc):
                raise
            if on_retry is not None:
                on_retry()
            time.sleep(min(most_s, pause_s * 2**attempt) * random.uniform(0.5, 1.5))
    raise AssertionError("unreachable")


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


def _windows(path: Path, size: int) -> Iterator[tuple[int, list[bytes]]]:
    """(window index, lines without their newline) for consecutive groups of `size` lines."""
    with open(path, "rb") as handle:
        window: list[bytes] = []
        index = 0
        for line in handle:
            window.append(line.rstrip(b"\r\n"))
            if len(window) == size:
                yield index, window
                index, window = index + 1, []
        if window:
            yield index, window


def length_sorted_requests(lines: list[bytes], batch: int, descending: bool = False) -> list[np.ndarray]:
    """The positions of `lines` in requests of at most `batch`, by UTF-8 length (a stable sort), so that each
    request's texts pad to about the same length."""
    order = np.argsort(np.fromiter(map(len, lines), np.int64, len(lines)), kind="stable")
    if descending:
        order = order[::-1]
    return [order[start:start + batch] for start in range(0, len(order), batch)]


class NpyRows:
    """Row-range writes into an existing 2-D float .npy file with `os.pwrite` (no mapping: the process's RSS stays
    flat; the page cache holds what is written)."""

    def __init__(self, path: Path):
        with path.open("rb") as handle:
            version = np.lib.format.read_magic(handle)
            read_header = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
            shape, fortran, dtype = read_header(handle)
            self.offset = handle.tell()
        if fortran or len(shape) != 2:
            raise ValueError(f"{path} is not a C-ordered 2-D array")
        self.path, self.shape, self.dtype = path, shape, dtype
        self.row_bytes = shape[1] * dtype.itemsize
        self.fd = os.open(path, os.O_WRONLY)

    def write(self, start: int, rows: np.ndarray) -> None:
        """Rows [start, start + len(rows)) := rows."""
        data = np.ascontiguousarray(rows, self.dtype).data
        written, offset = 0, self.offset + start * self.row_bytes
        while written < data.nbytes:  # pwrite may write less than asked
            written += os.pwrite(self.fd, data[written:], offset + written)

    def close(self) -> None:
        os.close(self.fd)


class _Counter:
    """A count that threads add to."""

    def __init__(self) -> None:
        self.value, self._lock = 0, threading.Lock()

    def add(self) -> None:
        with self._lock:
            self.value += 1


@dataclass
class _Window:
    """A window of lines being embedded: its rows as they come back, and the requests still out."""

    index: int
    rows: np.ndarray
    left: int
    failed: bool = False


def embed_file(source: Path, out: Path, options: BulkOptions, model: str = "text_embedding", batch: int = 64,
               restart: bool = False, window: int = 4096) -> dict:
    """Embed every line of `source` (row i = line i) into the .npy file `out`; returns a summary.

    Lines are read in windows of `window`; each window's lines go out in requests of `batch` texts of about the same
    length (short texts are not padded to a long one's length; windows alternate ascending and descending so that
    requests at a boundary match too), its rows are put back in line order and written at once; a window is the unit
    that a rerun skips when done."""
    if batch < 1 or window < 1:
        raise ValueError(f"batch and window must be >= 1 (got {batch}, {window})")
    total = count_lines(source)
    with TextEmbeddingClient(options.url, options.protocol, model) as probe:
        hidden = _output_width(probe, "embedding")
    batch = min(batch, probe.max_batch_size)
    windows = -(-total // window)
    state_path = out.with_name(out.name + ".done")
    meta_path = out.with_name(out.name + ".json")
    meta = {"source": str(source.resolve()), "lines": total, "hidden": hidden, "window": window, "model": model}
    resuming = not restart and out.exists() and state_path.exists() and meta_path.exists()
    if resuming and json.loads(meta_path.read_text()) != meta:
        raise ValueError(f"{out} belongs to another job ({meta_path}); pass --restart to start over")
    if not resuming:
        meta_path.write_text(json.dumps(meta))
        np.lib.format.open_memmap(out, mode="w+", dtype=np.float32, shape=(total, hidden)).flush()
        np.memmap(state_path, np.uint8, mode="w+", shape=(max(windows, 1),)).flush()
    embeddings = NpyRows(out)
    done = np.memmap(state_path, np.uint8, mode="r+", shape=(max(windows, 1),))
    finished = int(done[:windows].sum())
    if resuming:
        logger.info("resuming %s: %d of %d window(s) left", out, windows - finished, windows)
    already = sum(min(window, total - int(i) * window) for i in np.flatnonzero(done[:windows]))
    progress = progress_bar(total, "texts", options.progress, already=already)
    clients = _ThreadClients(lambda: TextEmbeddingClient(options.url, options.protocol, model, shm=options.shm,
                                                         shm_key=options.shm_key))
    failures: list[str] = []
    retried = _Counter()

    def tasks() -> Iterator[Callable[[], tuple[_Window, np.ndarray, np.ndarray]]]:
        for index, lines in _windows(source, window):
            if done[index]:
                continue
            requests = length_sorted_requests(lines, batch, descending=bool(index % 2))
            state = _Window(index, np.empty((len(lines), hidden), np.float32), len(requests))
            for positions in requests:
                yield functools.partial(_embed_request, clients, state, lines, positions, index * window,
                                        options.retries, retried.add)

    def on_done(future: Future) -> None:
        try:
            state, positions, rows = future.result()
        except _RequestFailed as failed:
            failed.window.failed = True
            failed.window.left -= 1
            failures.append(failed.message)
            return
        state.rows[positions] = rows
        state.left -= 1
        progress.update(len(positions))
        if state.left == 0 and not state.failed:
            embeddings.write(state.index * window, state.rows)
            done[state.index] = 1

    try:
        _run_bounded(tasks(), options.in_flight, on_done)
    finally:
        progress.close()
        done.flush()
        embeddings.close()
        clients.close()
    complete = int(done[:windows].sum()) == windows
    summary = {"texts": total, "hidden": hidden, "windows": windows, "failed_requests": len(failures),
               "retried_requests": retried.value, "complete": complete}
    if retried.value:
        logger.warning("the server turned %d request(s) away as busy and they were sent again: fewer --in-flight "
                       "would queue less", retried.value)
    if failures:
        logger.error("%d request(s) failed, their windows are not written (rerun to retry them); first: %s",
                     len(failures), failures[0])
    if complete:
        state_path.unlink(missing_ok=True)
        meta_path.unlink(missing_ok=True)
    return summary


class _RequestFailed(Exception):
    """A request of `window` failed with `message` (its window stays undone)."""

    def __init__(self, window: _Window, message: str):
        super().__init__(message)
        self.window, self.message = window, message


def _embed_request(clients: _ThreadClients, state: _Window, lines: list[bytes], positions: np.ndarray, first_line: int,
                   retries: int, on_retry: Callable[[], None]) -> tuple[_Window, np.ndarray, np.ndarray]:
    """The embeddings of `lines` at `positions`, from this thread's client; a failure names the file's lines."""
    try:
        texts = [lines[p] for p in positions]
        return state, positions, with_retries(lambda: clients.get().embed(texts), retries, on_retry=on_retry)
    except Exception as exc:  # noqa: BLE001 - a failed request leaves its window undone; a rerun retries it
        message = str(exc).splitlines()[0][:200] if str(exc) else type(exc).__name__
        numbers = ", ".join(str(first_line + int(p) + 1) for p in sorted(positions)[:8])
        raise _RequestFailed(state, f"lines {numbers}{' ...' if len(positions) > 8 else ''}: {message}") from exc


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
    progress = progress_bar(len(files), "images", options.progress, already=len(files) - len(todo))
    clients = _ThreadClients(lambda: ObjectDetectionClient(options.url, options.protocol, model, shm=options.shm,
                                                           shm_key=options.shm_key))
    lock = threading.Lock()
    counts = {"images": len(files), "detected": 0, "errors": 0}

    with open(out, "a", encoding="utf-8") as sink:
        def task(path: Path) -> Callable[[], dict]:
            def run() -> dict:
                name = _rel(path, folder)
                try:
                    data = path.read_bytes()
                    found = with_retries(lambda: clients.get().detect(data), options.retries)
                except Exception as exc:  # noqa: BLE001 - recorded per image
                    return {"file": name, "error": error_text(exc).splitlines()[0][:300]}
                return {"file": name, "boxes": found.boxes.round(2).tolist(), "scores": found.scores.round(4).tolist(),
                        "classes": found.classes.tolist()}
            return run

        def on_done(future: Future) -> None:
            record = future.result()
            with lock:
                sink.write(json.dumps(record) + "\n")
                sink.flush()
                counts["errors" if "error" in record else "detected"] += 1
            progress.update(1)

        try:
            _run_bounded((task(f) for f in todo), options.in_flight, on_done)
        finally:
            progress.close()
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
