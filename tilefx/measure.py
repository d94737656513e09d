"""Measured peak activation memory and latency of a call.

``peak_memory`` measures what docs/design.md calls peak memory: the highest total of tensor bytes
alive at once during one call, counting from the start of the call. Tensors that are alive
before the call (the weights, the caller's input) are not counted; tensors created during the
call are, including the ones still alive at its end (the output).

* On CPU the number is read from the allocator events that ``torch.profiler`` records with
  ``profile_memory=True``: every allocation and free, with its pointer and size, in the order
  they happened. The peak is the highest running sum of the bytes allocated during the call and
  not yet freed. PyTorch's CPU allocator reports the exact byte count that was asked for, so
  the result is exact (no rounding, no caching).
* On CUDA the number is ``torch.cuda.max_memory_allocated() - torch.cuda.memory_allocated()``
  around the call, after ``reset_peak_memory_stats``. The caching allocator rounds each block
  up (to 512 bytes at least), so CUDA figures are slightly larger than the CPU ones.

What the CPU figure includes, because it is real memory: small tensors that wrap Python
scalars (``x * 2`` allocates a few bytes besides its output), autograd's saved tensors when
``no_grad=False``, and oneDNN's per-call reordered copy of a convolution's weight (9 MiB for
the 512x512x3x3 convolutions of resnet18, which sets that model's peak at 224x224). Memory
that existed before the call and is freed during it is ignored on CPU; CUDA's counter is net,
so there such a free lowers the figure. An ordinary forward pass frees nothing it did not
allocate, and the two agree.

``latency`` times several callables interleaved in one process (A B, B A, A B, ...), so that
noise (other processes, frequency scaling, thermal drift) hits them alike, and reports the
median and the interquartile range of each.

Example::

    >>> import torch
    >>> from tilefx.measure import peak_memory, latency, ratio
    >>> def f(x):
    ...     tmp = torch.empty(1 << 20, dtype=torch.uint8)   # 1 MiB, freed on return
    ...     return torch.empty(1 << 19, dtype=torch.uint8)  # 512 KiB, returned
    >>> peak_memory(f, torch.zeros(8))
    1572864
    >>> stats = latency({"f": f, "g": lambda x: x + 1}, torch.zeros(8), repeats=5, warmup=1)
    >>> stats["f"].runs
    5
    >>> ratio(stats, "f", "g") > 0
    True
"""

from __future__ import annotations

import contextlib
import gc
import statistics
import time
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Mapping

import torch

__all__ = ["peak_memory", "latency", "ratio", "LatencyStats"]

_MARK = "tilefx.measure.call"


# --------------------------------------------------------------------------------------------
# peak memory


def peak_memory(
    fn: Callable[..., Any],
    *args: Any,
    device: str | torch.device | None = None,
    no_grad: bool = True,
    **kwargs: Any,
) -> int:
    """Measured peak activation bytes of one call ``fn(*args, **kwargs)``.

    The peak is the highest total of tensor bytes alive at once during the call, counting from
    the start of the call: tensors alive before the call (weights, the caller's input) are not
    counted, tensors created during the call are, the returned ones included.

    Args:
        fn: any callable, e.g. an ``nn.Module`` or a ``torch.fx.GraphModule``.
        *args, **kwargs: passed to ``fn``. Keyword arguments named ``device`` or ``no_grad``
            are taken by this function; wrap ``fn`` in a lambda to pass those through.
        device: where to measure: ``"cpu"`` or a CUDA device. ``None`` (default) picks the
            first CUDA device found among the tensors in ``args``/``kwargs`` (searched inside
            lists, tuples and dicts) and the parameters and buffers of ``fn`` if it is a
            module; otherwise CPU.
        no_grad: run the call under ``torch.no_grad()`` (default). With ``False`` the call
            runs in the caller's grad mode, so autograd's saved tensors count too.

    Returns:
        Peak bytes, an ``int`` (0 if the call allocates nothing).

    On CPU this runs the call once under ``torch.profiler.profile(profile_memory=True)``; the
    caller must not already be inside a profiler. The first call of a model may differ from
    later ones if it builds caches of tensors; call it once before measuring when that matters.

    Example::

        >>> import torch
        >>> def f():
        ...     a = torch.empty(1 << 18)   # 1 MiB of float32
        ...     b = torch.empty(1 << 18)
        ...     return a + b               # a, b and the sum alive at once: 3 MiB
        >>> peak_memory(f)
        3145728
    """
    if not callable(fn):
        raise TypeError(f"peak_memory: fn must be callable, got {type(fn).__name__}")
    dev = _resolve_device(device, fn, args, kwargs)
    grad_ctx = torch.no_grad() if no_grad else contextlib.nullcontext()
    if dev.type == "cpu":
        return _cpu_peak(fn, args, kwargs, grad_ctx)
    if dev.type == "cuda":
        return _cuda_peak(fn, args, kwargs, grad_ctx, dev)
    raise ValueError(f"peak_memory: device type {dev.type!r} is not supported (use cpu or cuda)")


def _iter_tensors(obj: Any, depth: int = 0) -> Iterable[torch.Tensor]:
    if isinstance(obj, torch.Tensor):
        yield obj
    elif depth < 4 and isinstance(obj, (list, tuple)):
        for item in obj:
            yield from _iter_tensors(item, depth + 1)
    elif depth < 4 and isinstance(obj, Mapping):
        for item in obj.values():
            yield from _iter_tensors(item, depth + 1)


def _resolve_device(device: Any, fn: Any, args: tuple, kwargs: dict) -> torch.device:
    if device is not None:
        try:
            return torch.device(device)
        except (RuntimeError, TypeError) as exc:
            raise ValueError(f"peak_memory: bad device {device!r}: {exc}") from None
    tensors = list(_iter_tensors(args)) + list(_iter_tensors(kwargs))
    if isinstance(fn, torch.nn.Module):
        tensors += list(fn.parameters()) + list(fn.buffers())
    for t in tensors:
        if t.device.type == "cuda":
            return t.device
    return torch.device("cpu")


def _cuda_peak(fn, args, kwargs, grad_ctx, dev: torch.device) -> int:
    # CUDA's counter is net: garbage from before the call, collected during it, would lower
    # the figure. (The CPU path matches frees to allocations and needs no collection.)
    gc.collect()
    torch.cuda.synchronize(dev)
    torch.cuda.reset_peak_memory_stats(dev)
    start = torch.cuda.memory_allocated(dev)
    with grad_ctx:
        out = fn(*args, **kwargs)
    torch.cuda.synchronize(dev)
    peak = torch.cuda.max_memory_allocated(dev) - start
    del out
    return max(int(peak), 0)


def _cpu_peak(fn, args, kwargs, grad_ctx) -> int:
    from torch.profiler import ProfilerActivity, profile, record_function

    if torch._C._autograd._profiler_enabled():
        # Starting a second session would silently end the caller's.
        raise RuntimeError("peak_memory: cannot measure on CPU inside an active torch.profiler")
    prof = profile(activities=[ProfilerActivity.CPU], profile_memory=True)
    with _quiet_stderr():  # kineto prints start/stop banners on the C-level stderr
        prof.start()
    try:
        with grad_ctx, record_function(_MARK):
            out = fn(*args, **kwargs)
    finally:
        with _quiet_stderr():
            prof.stop()
    del out
    return _peak_from_events(_cpu_memory_events(prof))


@contextlib.contextmanager
def _quiet_stderr():
    """Send file descriptor 2 to /dev/null for the duration (not Python-level warnings)."""
    import os
    import sys

    try:
        if sys.stderr is not None:
            sys.stderr.flush()
        saved = os.dup(2)
    except (OSError, AttributeError, ValueError):  # no usable fd 2: nothing to silence
        yield
        return
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        try:
            os.dup2(devnull, 2)
        finally:
            os.close(devnull)
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


def _cpu_memory_events(prof) -> list[tuple[int, int, int | None]]:
    """(time_ns, signed bytes, pointer or None) of each CPU allocator event inside the call.

    Reads the profiler's event tree (allocation records carry the pointer, so a free can be
    matched to its allocation); falls back to the flat ``[memory]`` events if the tree is not
    available in this torch version.
    """
    result = prof.profiler.kineto_results
    try:
        from torch._C._profiler import _EventType

        roots = result.experimental_event_tree()
    except (ImportError, AttributeError, RuntimeError):  # pragma: no cover - older/newer torch
        return _cpu_memory_events_flat(result)

    allocs, marks = [], []
    stack = list(roots)
    while stack:
        node = stack.pop()
        if node.tag == _EventType.Allocation:
            allocs.append(node)
        elif node.name == _MARK:
            marks.append(node)
        stack.extend(node.children)
    if not marks:  # pragma: no cover - the mark is always recorded
        raise RuntimeError("peak_memory: the profiler recorded no call marker")
    start, end = marks[0].start_time_ns, marks[0].end_time_ns
    events = []
    for node in allocs:
        extra = node.extra_fields
        if extra.device.type != "cpu" or not start <= node.start_time_ns <= end:
            continue
        events.append((node.start_time_ns, int(extra.alloc_size), int(extra.ptr)))
    return events


def _cpu_memory_events_flat(result) -> list[tuple[int, int, int | None]]:
    events, window = [], None
    raw = list(result.events())
    for ev in raw:
        if ev.name() == _MARK:
            window = (ev.start_ns(), ev.end_ns())
    if window is None:  # pragma: no cover
        raise RuntimeError("peak_memory: the profiler recorded no call marker")
    for ev in raw:
        if ev.name() == "[memory]" and ev.device_type() == torch.autograd.DeviceType.CPU:
            if window[0] <= ev.start_ns() <= window[1]:
                events.append((ev.start_ns(), int(ev.nbytes()), None))
    return events


def _peak_from_events(events: list[tuple[int, int, int | None]]) -> int:
    """Highest running sum of the bytes allocated in the window and not yet freed.

    A free of a pointer that was not allocated in the window releases memory that existed
    before the call; it is ignored (that memory was never counted). Events without pointers
    (fallback path) are summed as they come, with the running sum kept at or above zero.
    """
    live: dict[int, int] = {}
    current = peak = 0
    # sorted() is stable: events recorded at the same nanosecond keep their recorded order.
    for _, nbytes, ptr in sorted(events, key=lambda e: e[0]):
        if ptr is None:
            current = max(current + nbytes, 0)
        elif nbytes >= 0:
            current += nbytes - live.get(ptr, 0)
            live[ptr] = nbytes
        else:
            current -= live.pop(ptr, 0)
        peak = max(peak, current)
    return peak


# --------------------------------------------------------------------------------------------
# latency


@dataclass(frozen=True)
class LatencyStats:
    """Timing of one callable: median and interquartile range of ``runs`` timed calls."""

    median_s: float
    iqr_s: float
    runs: int

    def __str__(self) -> str:
        return f"{self.median_s * 1e3:.3f} ms (IQR {self.iqr_s * 1e3:.3f} ms, n={self.runs})"


def latency(
    fns: Mapping[str, Callable[..., Any]],
    *args: Any,
    repeats: int = 20,
    warmup: int = 2,
    no_grad: bool = True,
    **kwargs: Any,
) -> dict[str, LatencyStats]:
    """Time several callables on the same arguments, interleaved, in this process.

    Each round calls every callable once; the order rotates from round to round (A B C,
    B C A, C A B, ...), so no callable always runs first or right after another. ``warmup``
    untimed rounds come first. On CUDA (any tensor argument on a CUDA device) each call is
    synchronized before and after it is timed.

    Args:
        fns: name -> callable, each called as ``fn(*args, **kwargs)``.
        repeats: timed calls of each callable (at least 1).
        warmup: untimed rounds before them.
        no_grad: run under ``torch.no_grad()`` (default).

    Returns:
        name -> :class:`LatencyStats` (median and IQR in seconds, number of timed runs).

    Example::

        >>> import torch
        >>> x = torch.randn(64, 64)
        >>> stats = latency({"mm": lambda x: x @ x, "add": lambda x: x + x}, x, repeats=5)
        >>> sorted(stats), stats["mm"].runs
        (['add', 'mm'], 5)
    """
    if not isinstance(fns, Mapping) or not fns:
        raise TypeError("latency: fns must be a non-empty dict of name -> callable")
    for name, fn in fns.items():
        if not callable(fn):
            raise TypeError(f"latency: fns[{name!r}] is not callable")
    if isinstance(repeats, bool) or not isinstance(repeats, int) or repeats < 1:
        raise ValueError(f"latency: repeats must be an int >= 1, got {repeats!r}")
    if isinstance(warmup, bool) or not isinstance(warmup, int) or warmup < 0:
        raise ValueError(f"latency: warmup must be an int >= 0, got {warmup!r}")

    names = list(fns)
    cuda_devices = {t.device for t in _iter_tensors((args, kwargs)) if t.device.type == "cuda"}

    def sync() -> None:
        for dev in cuda_devices:
            torch.cuda.synchronize(dev)

    times: dict[str, list[float]] = {name: [] for name in names}
    grad_ctx = torch.no_grad() if no_grad else contextlib.nullcontext()
    with grad_ctx:
        for rnd in range(warmup + repeats):
            shift = rnd % len(names)
            for name in names[shift:] + names[:shift]:
                fn = fns[name]
                sync()
                t0 = time.perf_counter()
                out = fn(*args, **kwargs)
                sync()
                elapsed = time.perf_counter() - t0
                del out
                if rnd >= warmup:
                    times[name].append(elapsed)
    return {name: _stats(ts) for name, ts in times.items()}


def _stats(ts: list[float]) -> LatencyStats:
    if len(ts) < 2:
        return LatencyStats(median_s=ts[0], iqr_s=0.0, runs=len(ts))
    q1, _, q3 = statistics.quantiles(ts, n=4, method="inclusive")
    return LatencyStats(median_s=statistics.median(ts), iqr_s=q3 - q1, runs=len(ts))


def ratio(stats: Mapping[str, LatencyStats], a: str, b: str) -> float:
    """Median time of ``a`` over median time of ``b``: 1.5 means ``a`` takes 1.5x as long."""
    for name in (a, b):
        if name not in stats:
            raise KeyError(f"ratio: no timing named {name!r} (have {sorted(stats)})")
    if stats[b].median_s <= 0:
        raise ValueError(f"ratio: median time of {b!r} is {stats[b].median_s}, cannot divide")
    return stats[a].median_s / stats[b].median_s
