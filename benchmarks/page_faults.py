"""How much of an untiled call is the kernel faulting pages in: minor faults, kernel and user CPU
time and wall time per call, with torch's default allocation and with huge pages asked for.

    python benchmarks/page_faults.py                      # ResNet-50 @1024, 5 calls each
    python benchmarks/page_faults.py --model mobilenet_v2 --size 1024 --calls 8

glibc maps an allocation over its mmap threshold (at most 32 MiB) afresh unless a free chunk of
its heap fits it, and the kernel faults its pages in on first touch, on every call;
``THP_MEM_ALLOC_ENABLE=1`` makes torch ask for 2 MiB pages (fewer faults, each zeroing more),
and ``MALLOC_MMAP_MAX_=0`` with a high trim threshold keeps the memory in glibc's heap
(``allocator.ALLOCATORS``). A tiled plan's buffers are small and reused, so this is time tiling
avoids: BENCHMARKS.md's "kernel share" column shows it per row,
its allocator section the plans' times under each allocator. Each setting runs in its own
process (the variables are read when it starts). Not part of the test suite.
"""

from __future__ import annotations

import argparse
import os
import resource
import subprocess
import sys
import time


def measure(model: str, size: int, calls: int) -> None:
    import torch
    import torchvision

    torch.manual_seed(0)
    m = getattr(torchvision.models, model)(weights=None).eval()
    x = torch.randn(1, 3, size, size)
    with torch.no_grad():
        m(x)  # warm-up
        for _ in range(calls):
            r0, t0 = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
            m(x)
            t1, r1 = time.perf_counter(), resource.getrusage(resource.RUSAGE_SELF)
            print(f"  {(t1 - t0) * 1e3:6.0f} ms wall, {r1.ru_minflt - r0.ru_minflt:7d} minor faults, "
                  f"kernel {r1.ru_stime - r0.ru_stime:5.2f} s, user {r1.ru_utime - r0.ru_utime:5.2f} s",
                  flush=True)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="resnet50")
    ap.add_argument("--size", type=int, default=1024)
    ap.add_argument("--calls", type=int, default=5)
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        measure(args.model, args.size, args.calls)
        return
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from allocator import ALLOCATORS  # the allocator section's settings (no torch import)

    for label, env in ALLOCATORS.items():
        print(f"{args.model} @{args.size}, untiled, {label}:", flush=True)
        subprocess.run([sys.executable, __file__, "--child", "--model", args.model,
                        "--size", str(args.size), "--calls", str(args.calls)],
                       env={**os.environ, **env}, check=True)


if __name__ == "__main__":
    main()
