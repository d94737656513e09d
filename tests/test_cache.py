"""The on-disk measurement cache (``tilefx.cache``): a second process on the same machine plans
exactly as the first, without measuring anything again.

The suite runs with the cache off (``conftest``: ``TILEFX_CACHE_DIR=""``); these tests point it
at a fresh folder.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch

from tilefx import cache, cost


@pytest.fixture
def cache_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("TILEFX_CACHE_DIR", str(tmp_path / "cache"))
    return tmp_path / "cache"


def test_the_cache_is_off_where_the_variable_is_empty(monkeypatch):
    monkeypatch.setenv("TILEFX_CACHE_DIR", "")
    cache.store("kind", ("k",), 1.5)
    assert cache.cache_dir() is None and cache.load("kind", ("k",)) is None


def test_the_default_folder_follows_xdg(monkeypatch, tmp_path):
    monkeypatch.delenv("TILEFX_CACHE_DIR", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert cache.cache_dir() == tmp_path / "tilefx"


def test_a_value_round_trips_and_keys_differ(cache_dir):
    cache.store("kind", ("k", 1), {"a": [1.0, float("inf")]})
    assert cache.load("kind", ("k", 1)) == {"a": [1.0, float("inf")]}
    assert cache.load("kind", ("k", 2)) is None
    assert cache.load("other", ("k", 1)) is None
    cache.clear()
    assert cache.load("kind", ("k", 1)) is None


def test_a_damaged_entry_reads_as_missing(cache_dir):
    cache.store("kind", "k", [1, 2])
    (path,) = (cache_dir / "kind").iterdir()
    path.write_text("{not json")
    assert cache.load("kind", "k") is None


def test_the_key_holds_the_thread_count(cache_dir):
    """Timings taken with 2 threads say nothing about 1."""
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        cache.store("kind", "k", 1.0)
        torch.set_num_threads(2)
        assert cache.load("kind", "k") is None
    finally:
        torch.set_num_threads(threads)


@pytest.mark.parametrize("var", cache.ALLOCATOR_ENV)
def test_the_key_holds_the_allocator_settings(cache_dir, monkeypatch, var):
    """Timings taken with huge pages (or jemalloc, or other glibc thresholds) say nothing about
    the default allocation: an untiled call at 1024 is up to half page faults."""
    monkeypatch.delenv(var, raising=False)
    cache.store("kind", "k", 1.0)
    monkeypatch.setenv(var, "1")
    assert cache.load("kind", "k") is None
    monkeypatch.delenv(var)
    assert cache.load("kind", "k") == 1.0


def test_calibration_is_read_back_not_measured_again(cache_dir, monkeypatch):
    cost.calibrate.cache_clear()
    try:
        first = cost.calibrate()
        cost.calibrate.cache_clear()

        def measure_again():
            raise AssertionError("calibrated again despite the cache")

        monkeypatch.setattr(cost, "_calibrate", measure_again)
        assert cost.calibrate() == first
    finally:
        cost.calibrate.cache_clear()


def test_node_costs_are_read_back_not_measured_again(cache_dir, monkeypatch):
    from tilefx.api import prepare
    from tilefx.passes.receptive_field import annotate

    model = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.ReLU(),
                                torch.nn.Conv2d(8, 8, 3, padding=1)).eval()
    x = torch.randn(1, 3, 32, 32)
    gm = prepare(model, x)
    annotate(gm, x)
    cal = cost.calibrate()
    cost.clear_measurements()
    first = cost.measure_node_costs(gm, x, cal)
    cost.clear_measurements()

    def measure_again(*a, **k):
        raise AssertionError("measured again despite the cache")

    monkeypatch.setattr(cost, "_measure", measure_again)
    assert cost.measure_node_costs(gm, x, cal) == first
    cost.clear_measurements()


_PLAN = textwrap.dedent("""
    import json, sys, types, torch
    torch.set_num_threads(1)
    import tilefx
    from tilefx import autotune, cost, primitives
    if sys.argv[1] == "nothing-measured":
        def refuse(*a, **k):
            raise AssertionError("measured despite the cache")
        cost._calibrate = cost._measure = autotune.latency = refuse
        primitives.time = types.SimpleNamespace(perf_counter=refuse)  # time_primitives
    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Conv2d(3, 16, 3, padding=1), torch.nn.ReLU(),
        torch.nn.Conv2d(16, 16, 3, padding=1), torch.nn.ReLU(),
        torch.nn.MaxPool2d(2), torch.nn.Conv2d(16, 32, 3, padding=1)).eval()
    x = torch.randn(1, 3, 128, 128)
    p = tilefx.plan(model, x, max_overhead=2.0)  # a bound loose enough to tile: a tuned choice
    gm = tilefx.transform(model, x, max_overhead=2.0)
    torch.testing.assert_close(gm(x), model(x), rtol=1e-4, atol=1e-5)
    print(json.dumps([repr(p.rewrite), p.peak_bytes, p.time_s, p.tuned, gm.code]))
""")


def _plan_in_a_process(cache_dir, mode: str) -> list:
    env = {**os.environ, "TILEFX_CACHE_DIR": str(cache_dir), "OMP_NUM_THREADS": "1"}
    out = subprocess.run([sys.executable, "-c", _PLAN, mode], env=env, capture_output=True,
                         text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_a_second_process_plans_the_same_without_measuring(cache_dir):
    """Item 8 of the planner issue: the same model, shape and machine give the same plan, run
    after run. The second process measures nothing (every measuring function raises there):
    its calibration, node times, primitive times and tuned choice all come from the first."""
    first = _plan_in_a_process(cache_dir, "measure")
    assert first[3], "the plan was not tuned: the test would not cover the tuned choice"
    assert {p.name for p in cache_dir.iterdir()} >= {"calibration", "node_costs", "tuned"}
    second = _plan_in_a_process(cache_dir, "nothing-measured")
    assert second == first


def test_a_folder_that_cannot_be_written_is_skipped(tmp_path, monkeypatch):
    blocker = tmp_path / "file"
    blocker.write_text("")
    monkeypatch.setenv("TILEFX_CACHE_DIR", str(blocker / "cache"))  # under a file: no folder
    cache.store("kind", "k", 1.0)
    assert cache.load("kind", "k") is None
