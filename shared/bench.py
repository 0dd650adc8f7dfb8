"""Timing with warm-up and repeats, and memory accounting (tensor bytes, and the process's resident memory)."""
from __future__ import annotations

import ctypes
import os
import resource
import statistics
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch


@dataclass
class Timing:
    median: float          # seconds
    lo: float              # fastest repeat
    hi: float              # slowest repeat
    times: list[float]

    def __str__(self) -> str:
        return f"{self.median * 1e3:.2f} ms (min {self.lo * 1e3:.2f}, max {self.hi * 1e3:.2f}, n={len(self.times)})"


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def timeit(fn: Callable[[], object], warmup: int = 2, repeats: int = 7,
           clock: Callable[[], float] = time.perf_counter) -> Timing:
    """Run fn `warmup` times untimed, then `repeats` timed runs (device synchronised); median and spread.

    `clock=time.process_time` counts this process's CPU seconds instead of wall time: steadier on a busy machine,
    but it adds up the time of every thread, so use it with `torch.set_num_threads(1)` or read it as CPU work.
    """
    if warmup < 0 or repeats < 1:
        raise ValueError(f"need warmup >= 0 and repeats >= 1, got {warmup}, {repeats}")
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        _sync()
        t0 = clock()
        fn()
        _sync()
        times.append(clock() - t0)
    return Timing(statistics.median(times), min(times), max(times), times)


def tensor_bytes(*items) -> int:
    """Bytes of memory held by tensors and/or modules (parameters + buffers), each byte counted once.

    A tensor and a view of it (a slice, a transpose, a tied weight) share storage: the bytes counted are the
    union of the storage ranges the given tensors span, so overlapping views add nothing.
    """
    spans: dict[object, list[tuple[int, int]]] = {}

    def add(t: torch.Tensor):
        if t.numel() == 0:
            return
        size = t.element_size()
        extent = 1 + sum((n - 1) * abs(s) for n, s in zip(t.shape, t.stride()))   # elements from first to last
        start = t.storage_offset() * size
        # meta tensors have no storage address: tell them apart by identity instead
        key = ("meta", id(t)) if t.is_meta else (t.device, t.untyped_storage().data_ptr())
        spans.setdefault(key, []).append((start, start + extent * size))

    def visit(item):
        if isinstance(item, torch.Tensor):
            add(item)
        elif isinstance(item, torch.nn.Module):
            for t in list(item.parameters()) + list(item.buffers()):
                add(t)
        elif isinstance(item, (list, tuple)):
            for x in item:
                visit(x)
        else:
            raise TypeError(f"expected tensors, modules or lists of them, got {type(item).__name__}")

    visit(items)
    total = 0
    for ranges in spans.values():               # union of [start, end) byte ranges per storage
        end_so_far = -1
        for start, end in sorted(ranges):
            if end > end_so_far:
                total += end - max(start, end_so_far)
                end_so_far = end
    return total


def peak_rss_bytes() -> int:
    """Peak resident set size of this process so far (CPU; from getrusage)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024


def rss_bytes() -> int:
    """Current resident set size of this process (Linux /proc/self/statm); not the peak."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def large_allocations_from_os(threshold_bytes: int = 256 * 1024) -> bool:
    """Ask glibc to serve every allocation above `threshold_bytes` with its own fresh mmap and unmap it on free.

    By default glibc raises this threshold as a program frees big blocks and then recycles already-resident
    heap memory, so RSS stops tracking live tensors. With a fixed threshold, a big tensor's pages become
    resident only when written and go back to the OS when freed: RSS then measures what is live. Call it right
    before a memory measurement, not in a notebook's set-up: while it holds, every big allocation pays fresh page
    faults (09 measured its training steps ~1.7x slower in CPU time). Afterwards raise the threshold again, e.g.
    `large_allocations_from_os(32 * 2**20)`. Returns False where this is not glibc.
    """
    if not isinstance(threshold_bytes, int) or threshold_bytes < 0:
        raise ValueError(f"threshold_bytes must be a non-negative int, got {threshold_bytes!r}")
    try:
        libc = ctypes.CDLL("libc.so.6")
        M_MMAP_THRESHOLD = -3
        return bool(libc.mallopt(M_MMAP_THRESHOLD, threshold_bytes))
    except (OSError, AttributeError):
        return False


def _release_free_heap() -> None:
    """glibc's malloc_trim(0): hand the heap's free pages back to the OS. Without it, memory freed earlier stays
    resident and is silently reused, so a new buffer would not raise RSS (a mmap threshold alone does not help:
    glibc serves a request from a free heap chunk before it considers mmap)."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


class PeakRSS:
    """Peak growth of resident memory while a block runs, sampled by a background thread.

        with PeakRSS() as mem:
            y = attention(q, k, v)
        mem.peak_growth      # bytes above the RSS at entry (>= 0)

    Torch kernels release the GIL, so the sampler runs during them; a buffer alive for less than `interval_s`
    can be missed, so read small values as "at most about this". Entering returns the heap's free pages to the OS
    first (glibc), so that reused memory counts. Use with `large_allocations_from_os()`.
    """

    def __init__(self, interval_s: float = 2e-4):
        if not interval_s > 0:
            raise ValueError(f"interval_s must be > 0, got {interval_s!r}")
        self.interval_s = interval_s
        self.peak_growth = 0
        self._stop = threading.Event()

    def _sample(self) -> None:
        while not self._stop.is_set():
            self._peak = max(self._peak, rss_bytes())
            time.sleep(self.interval_s)

    def __enter__(self) -> "PeakRSS":
        _release_free_heap()
        self._start = self._peak = rss_bytes()
        self._stop.clear()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._peak = max(self._peak, rss_bytes())
        self._stop.set()
        self._thread.join()
        self.peak_growth = max(0, self._peak - self._start)


def memory_bandwidth(nbytes: int = 256 * 2**20, kind: str = "read", repeats: int = 5,
                     clock: Callable[[], float] = time.perf_counter) -> tuple[float, Timing]:
    """This machine's memory bandwidth in bytes/s, measured with a plain kernel on a buffer far larger than any
    cache (`nbytes`, default 256 MiB of float32), on the current torch threads; returns (bytes/s, timing).

    kind="read": `sum` of the buffer, `nbytes` read per run (what a decode step does to its weights and KV cache).
    kind="copy": `copy_` into a second buffer, counted as 2 x `nbytes` (read + write, as STREAM's copy does).
    The median run is used. A roofline's memory roof; on a busy machine other processes share the bandwidth.
    """
    from .validate import check_choice, check_int

    check_int("nbytes", nbytes, 2**20)
    check_choice("kind", kind, ("read", "copy"))
    src = torch.ones(nbytes // 4, dtype=torch.float32)
    dst = torch.empty_like(src) if kind == "copy" else None
    fn = (lambda: dst.copy_(src)) if kind == "copy" else src.sum
    timing = timeit(fn, warmup=1, repeats=repeats, clock=clock)
    moved = 2 * src.numel() * 4 if kind == "copy" else src.numel() * 4
    return moved / timing.median, timing


def matmul_flops(n: int = 1024, repeats: int = 5, clock: Callable[[], float] = time.perf_counter) -> tuple[float, Timing]:
    """Achievable float32 FLOP/s of this machine: an n x n @ n x n matmul (2n^3 FLOPs) on the current torch threads,
    median of `repeats`; returns (FLOP/s, timing). A roofline's compute roof."""
    from .validate import check_int

    check_int("n", n, 16)
    a, b = torch.randn(n, n), torch.randn(n, n)
    timing = timeit(lambda: a @ b, warmup=1, repeats=repeats, clock=clock)
    return 2 * n**3 / timing.median, timing
