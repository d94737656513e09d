"""tilefx.measure against allocations whose sizes are known.

PyTorch's CPU allocator reports the exact byte count of every allocation to the profiler, so
the CPU peaks below are compared for equality. CUDA's caching allocator rounds blocks up to
512 bytes; the CUDA test (skipped without a GPU) uses sizes that are multiples of that.
"""

from __future__ import annotations

import dataclasses
import doctest
import time

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import tilefx.measure as measure
from tilefx.measure import LatencyStats, latency, peak_memory, ratio

MiB = 1 << 20


def _bytes(n: int) -> torch.Tensor:
    return torch.empty(n, dtype=torch.uint8)


# --------------------------------------------------------------------------------------------
# peak_memory: known allocations (CPU, exact)


def test_freed_temporary_sets_the_peak():
    def f():
        a = _bytes(4 * MiB)
        del a
        return _bytes(2 * MiB)

    assert peak_memory(f) == 4 * MiB


def test_two_inputs_and_their_sum_alive_at_once():
    def f():
        a = torch.empty(MiB // 4)  # float32: 1 MiB
        b = torch.empty(MiB // 4)
        return a + b

    assert peak_memory(f) == 3 * MiB


def test_output_is_counted_input_is_not():
    x = torch.zeros(MiB // 4)  # 1 MiB, alive before the call
    assert peak_memory(lambda t: t, x) == 0
    assert peak_memory(lambda t: t.add_(t), x) == 0  # in place: nothing new
    assert peak_memory(lambda t: t.view(-1, 4), x) == 0  # a view shares storage
    assert peak_memory(lambda t: t * t, x) == MiB
    assert peak_memory(lambda t: t.clone(), x) == MiB
    # A Python scalar operand is wrapped in a tiny tensor for the op; it is real memory too.
    assert 0 < peak_memory(lambda t: t.add_(1), x) <= 64
    assert MiB < peak_memory(lambda t: t * 2, x) <= MiB + 64


def test_nothing_allocated_is_zero():
    assert peak_memory(lambda: 1 + 1) == 0


def test_returned_tensors_all_count():
    def f():
        return [_bytes(1000), _bytes(2000)], {"c": _bytes(3)}

    assert peak_memory(f) == 3003


def test_temporaries_inside_a_call_count_in_order():
    def f():
        a = _bytes(100)
        b = _bytes(200)
        del a  # 200 alive
        c = _bytes(50)  # 250
        d = _bytes(300)  # 550 <- peak
        del b, c, d
        return _bytes(10)

    assert peak_memory(f) == 550


def test_memory_from_before_the_call_freed_during_it_is_not_subtracted():
    holder = {}

    def make():
        holder["t"] = _bytes(3 * MiB)

    # Allocated under an earlier profiling session, so the profiler sees its free later.
    assert peak_memory(make) == 3 * MiB

    def free_then_alloc():
        del holder["t"]
        return _bytes(MiB)

    assert peak_memory(free_then_alloc) == MiB


def test_args_and_kwargs_are_passed():
    def f(n, *, scale):
        return _bytes(n * scale)

    assert peak_memory(f, 10, scale=3) == 30


def test_flat_event_fallback_agrees_on_known_allocations(monkeypatch):
    def flat(prof):
        return measure._cpu_memory_events_flat(prof.profiler.kineto_results)

    monkeypatch.setattr(measure, "_cpu_memory_events", flat)

    def f():
        a = _bytes(4 * MiB)
        del a
        return _bytes(2 * MiB)

    assert peak_memory(f) == 4 * MiB


def test_peak_from_events_matches_pointers():
    ev = measure._peak_from_events
    assert ev([]) == 0
    # (time, bytes, ptr): alloc 10 @1, alloc 5 @2, free 10, free of an unknown pointer (ignored)
    assert ev([(0, 10, 1), (1, 5, 2), (2, -10, 1), (3, -99, 7), (4, 8, 3)]) == 15
    # events arrive out of time order: they are sorted first
    assert ev([(4, 8, 3), (2, -10, 1), (0, 10, 1), (1, 5, 2)]) == 15
    # no pointers (fallback): running sum kept at >= 0
    assert ev([(0, -50, None), (1, 20, None), (2, 30, None)]) == 50


@settings(max_examples=30, deadline=None)
@given(
    st.lists(
        st.tuples(st.booleans(), st.integers(min_value=1, max_value=1 << 16)),
        min_size=1,
        max_size=12,
    )
)
def test_random_alloc_free_sequences(ops):
    """Allocate when the flag is True, else free the oldest live tensor; compare to a model."""

    def f():
        live = []
        for alloc, n in ops:
            if alloc or not live:
                live.append(_bytes(n))
            else:
                live.pop(0)
        return live

    live, current, expected = [], 0, 0
    for alloc, n in ops:
        if alloc or not live:
            live.append(n)
            current += n
        else:
            current -= live.pop(0)
        expected = max(expected, current)
    assert peak_memory(f) == expected


# --------------------------------------------------------------------------------------------
# peak_memory: grad mode, devices, errors


def test_no_grad_is_the_default():
    seen = []

    def f():
        seen.append(torch.is_grad_enabled())

    peak_memory(f)
    peak_memory(f, no_grad=False)
    assert seen == [False, True]


def test_saved_activations_count_with_grad():
    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Linear(256, 256), torch.nn.Tanh(), torch.nn.Linear(256, 256), torch.nn.Tanh()
    )
    x = torch.randn(64, 256)
    # 64*256*4 = 64 KiB per activation. Without grad, at most two are alive at once (a layer's
    # input and output). With grad, tanh keeps its outputs for the backward pass, so the first
    # tanh's output is still alive while the second linear and tanh run: three at once.
    act = 64 * 256 * 4
    assert peak_memory(model, x) == 2 * act
    assert peak_memory(model, x, no_grad=False) == 3 * act


def test_real_model_peak_is_plausible_and_repeatable():
    torchvision = pytest.importorskip("torchvision")
    model = torchvision.models.resnet18().eval()
    x = torch.randn(1, 3, 224, 224)
    first = peak_memory(model, x)
    assert peak_memory(model, x) == first
    # conv1's output and bn1's output (64x112x112 float32 each) are alive at once.
    assert first >= 2 * 64 * 112 * 112 * 4
    # tens of MB at most (the largest CPU temporary is oneDNN's 9 MiB copy of a 512x512x3x3
    # weight); well under the 44 MB of weights, which are not counted.
    assert first < 40_000_000


def test_explicit_cpu_device():
    assert peak_memory(lambda: _bytes(64), device="cpu") == 64
    assert peak_memory(lambda: _bytes(64), device=torch.device("cpu")) == 64


def test_bad_arguments():
    with pytest.raises(TypeError):
        peak_memory(42)
    with pytest.raises(ValueError):
        peak_memory(lambda: None, device="not-a-device")
    with pytest.raises(ValueError):
        peak_memory(lambda: None, device="meta")


def test_refuses_to_run_inside_an_active_profiler():
    with torch.profiler.profile():
        with pytest.raises(RuntimeError, match="active torch.profiler"):
            peak_memory(lambda: _bytes(8))


def test_exception_in_fn_propagates_and_profiler_is_stopped():
    def boom():
        _bytes(8)
        raise KeyError("boom")

    with pytest.raises(KeyError):
        peak_memory(boom)
    assert not torch._C._autograd._profiler_enabled()
    assert peak_memory(lambda: _bytes(8)) == 8


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_known_allocations():
    dev = torch.device("cuda")
    x = torch.zeros(MiB // 4, device=dev)

    def f(t):
        a = torch.empty(4 * MiB, dtype=torch.uint8, device=dev)
        del a
        return torch.empty(2 * MiB, dtype=torch.uint8, device=dev)

    assert peak_memory(f, x) == 4 * MiB  # device picked from the argument
    assert peak_memory(lambda t: t * 2, x) == MiB
    assert peak_memory(lambda t: t, x) == 0


# --------------------------------------------------------------------------------------------
# latency


def test_latency_interleaves_and_reports_stats():
    order = []

    def make(name, sleep):
        def fn(x):
            order.append(name)
            time.sleep(sleep)
            return x

        return fn

    fns = {"slow": make("slow", 0.004), "fast": make("fast", 0.0)}
    stats = latency(fns, torch.zeros(1), repeats=6, warmup=1)
    assert set(stats) == {"slow", "fast"}
    for s in stats.values():
        assert isinstance(s, LatencyStats)
        assert s.runs == 6
        assert s.median_s > 0 and s.iqr_s >= 0
    assert stats["slow"].median_s >= 0.004
    assert ratio(stats, "slow", "fast") > 1
    # 7 rounds of one call each; the order rotates so neither always runs first
    assert len(order) == 14
    firsts = order[0::2]
    assert "slow" in firsts and "fast" in firsts


def test_latency_runs_under_no_grad_by_default():
    seen = []
    latency({"f": lambda: seen.append(torch.is_grad_enabled())}, repeats=2, warmup=0)
    latency({"f": lambda: seen.append(torch.is_grad_enabled())}, repeats=1, warmup=0, no_grad=False)
    assert seen == [False, False, True]


def test_latency_single_run_has_zero_iqr():
    stats = latency({"f": lambda: None}, repeats=1, warmup=0)
    assert stats["f"].runs == 1 and stats["f"].iqr_s == 0.0


def test_latency_stats_are_frozen():
    s = LatencyStats(median_s=1.0, iqr_s=0.1, runs=3)
    with pytest.raises(dataclasses.FrozenInstanceError):
        s.median_s = 2.0  # type: ignore[misc]
    assert "ms" in str(s)


def test_latency_bad_arguments():
    with pytest.raises(TypeError):
        latency({})
    with pytest.raises(TypeError):
        latency({"a": 1})
    with pytest.raises(ValueError):
        latency({"a": lambda: None}, repeats=0)
    with pytest.raises(ValueError):
        latency({"a": lambda: None}, warmup=-1)


def test_ratio():
    stats = {"a": LatencyStats(3.0, 0.0, 1), "b": LatencyStats(2.0, 0.0, 1)}
    assert ratio(stats, "a", "b") == pytest.approx(1.5)
    with pytest.raises(KeyError):
        ratio(stats, "a", "c")
    with pytest.raises(ValueError):
        ratio({"a": LatencyStats(1.0, 0, 1), "z": LatencyStats(0.0, 0, 1)}, "a", "z")


# --------------------------------------------------------------------------------------------
# documentation


def test_docstring_examples_run():
    result = doctest.testmod(measure, raise_on_error=False)
    assert result.attempted > 0
    assert result.failed == 0
