"""Measurements kept on disk, per machine: the same model, shape and machine plan the same.

The planner's choices rest on timings taken at plan time (``cost.calibrate``'s machine
constants, ``cost.measure_node_costs``'s node times, ``primitives.time_primitives``'s primitive
times, ``autotune``'s measured plans). Under ordinary load those differ from process to
process, and near a decision boundary so does the plan: MobileNetV2 @224's default was tiled
at 4.8x in one benchmark run and left untiled in the next. Each of them is kept in memory for
the process; this module keeps them on disk too, so a second process finds the first one's
measurements and plans exactly as it did (the way torch.compile keeps its autotuning results).

* Where: ``$TILEFX_CACHE_DIR``, else ``$XDG_CACHE_HOME/tilefx``, else ``~/.cache/tilefx``.
  ``TILEFX_CACHE_DIR=""`` turns the disk cache off (every process measures afresh; the
  benchmarks run so, and so does the test suite).
* Keys: a SHA-256 of the caller's key (plain values: graph code, shapes, settings) and of this
  machine and software (CPU model, vector ISA and count, thread count, torch and python
  versions, a hash of tilefx's own source, so that changing the code measures afresh, and the
  allocator's settings in the environment, :data:`ALLOCATOR_ENV`).
* Values: JSON, one file per entry, written atomically (``os.replace``); an unreadable entry
  is measured again.

:func:`clear` removes every entry.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import platform
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch

__all__ = ["cache_dir", "load", "store", "clear", "cpu_name", "ALLOCATOR_ENV"]

_ENV = "TILEFX_CACHE_DIR"


def cache_dir() -> Path | None:
    """The cache's folder, or None where ``TILEFX_CACHE_DIR`` is set empty (off)."""
    env = os.environ.get(_ENV)
    if env is not None:
        return Path(env).expanduser() if env.strip() else None
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "tilefx"


@functools.lru_cache(maxsize=None)
def _source_hash() -> str:
    """A hash of tilefx's source files: a changed rule or cost formula measures afresh."""
    h = hashlib.sha256()
    root = Path(__file__).parent
    for path in sorted(root.rglob("*.py")):
        h.update(str(path.relative_to(root)).encode())
        h.update(path.read_bytes())
    return h.hexdigest()


@functools.lru_cache(maxsize=None)
def cpu_name() -> str:
    """The CPU's model and the widest vector ISA torch's kernels use on it (two 2-core x86_64
    machines ran MobileNetV2 @1024 at 294 ms and 1.6 s untiled: AVX-512 and AVX2)."""
    name = platform.processor() or ""
    try:
        with open("/proc/cpuinfo") as f:
            name = next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")),
                        name)
    except OSError:
        pass
    return f"{name or 'unknown CPU'}, {torch.backends.cpu.get_cpu_capability()}"


#: Environment variables that change how memory is allocated, and so what a call costs: an
#: untiled ResNet-50 @1024 call takes 645k page faults under glibc's defaults and 36k-51k with
#: ``THP_MEM_ALLOC_ENABLE=1`` (torch asks for 2 MiB pages); jemalloc or tcmalloc come in by
#: ``LD_PRELOAD``, and glibc reads its thresholds from ``GLIBC_TUNABLES`` and ``MALLOC_*_``.
ALLOCATOR_ENV = ("THP_MEM_ALLOC_ENABLE", "LD_PRELOAD", "GLIBC_TUNABLES", "MALLOC_ARENA_MAX",
                 "MALLOC_MMAP_THRESHOLD_", "MALLOC_MMAP_MAX_", "MALLOC_TRIM_THRESHOLD_",
                 "MALLOC_TOP_PAD_")


def _machine() -> tuple:
    """What every measurement depends on besides its own key (read per call: the thread count
    can change): the machine, the software, and how memory is allocated."""
    return (platform.machine(), cpu_name(), os.cpu_count(), torch.get_num_threads(),
            torch.__version__, platform.python_version(), _source_hash(),
            tuple(os.environ.get(v, "") for v in ALLOCATOR_ENV))


def _path(kind: str, key: Any) -> Path | None:
    root = cache_dir()
    if root is None:
        return None
    digest = hashlib.sha256(repr((_machine(), key)).encode()).hexdigest()
    return root / kind / f"{digest}.json"


def load(kind: str, key: Any) -> Any | None:
    """The value stored for ``key`` (``repr`` must be stable across processes), or None."""
    path = _path(kind, key)
    if path is None:
        return None
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def store(kind: str, key: Any, value: Any) -> None:
    """Keep ``value`` (JSON) for ``key``; a folder that cannot be written is skipped silently
    (the value stays in the caller's memory cache)."""
    path = _path(kind, key)
    if path is None:
        return
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".tmp")
    except OSError:
        return
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(value, f)
        os.replace(tmp, path)  # readers see the old entry or the whole new one
    except (OSError, TypeError, ValueError):
        try:
            os.unlink(tmp)
        except OSError:
            pass


def clear() -> None:
    """Remove every stored measurement (the folder of :func:`cache_dir`)."""
    root = cache_dir()
    if root is not None and root.is_dir():
        shutil.rmtree(root, ignore_errors=True)
