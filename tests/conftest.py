"""Shared test configuration: hypothesis profiles and the ``slow`` marker.

Hypothesis: the "ci" profile (derandomized, no deadline, a modest example count, failing
examples printed as reproduction blobs) is loaded when the ``CI`` environment variable is set;
"dev" otherwise. ``HYPOTHESIS_PROFILE`` overrides both.

Under pytest-xdist (the README's ``-n 2``) every worker runs single-threaded.

``@pytest.mark.slow`` tests (the full model zoo) are skipped unless ``-m slow`` selects them or
``RUN_SLOW=1`` is set.
"""

from __future__ import annotations

import os

import pytest
import torch
from hypothesis import HealthCheck, settings

settings.register_profile(
    "ci",
    derandomize=True,
    deadline=None,
    max_examples=25,
    print_blob=True,
    suppress_health_check=[HealthCheck.too_slow],
)
settings.register_profile(
    "dev",
    deadline=None,
    max_examples=40,
    print_blob=True,
    suppress_health_check=[HealthCheck.too_slow],
)
if os.environ.get("PYTEST_XDIST_WORKER"):
    # The README's test command runs two xdist workers, one per core of a 2-core machine:
    # each worker (and each notebook kernel it starts, which inherits the environment) takes
    # one thread, so the two never oversubscribe the cores.
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    os.environ.setdefault("MKL_NUM_THREADS", "1")
    torch.set_num_threads(1)

# Every test measures afresh: no measurement kept on disk by an earlier run (``tilefx.cache``)
# decides a plan here, and the suite writes none (tests/test_cache.py points it at a temporary
# folder). Notebook kernels and subprocesses inherit the setting.
os.environ["TILEFX_CACHE_DIR"] = ""

settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE") or ("ci" if os.environ.get("CI") else "dev"))


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "slow: long-running tests (full model zoo); -m slow or RUN_SLOW=1")


def _slow_selected(config: pytest.Config) -> bool:
    if os.environ.get("RUN_SLOW", "") not in ("", "0"):
        return True
    expr = config.getoption("-m") or ""
    return "slow" in expr and "not slow" not in expr


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if _slow_selected(config):
        return
    skip = pytest.mark.skip(reason="slow: run with -m slow or RUN_SLOW=1")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _deterministic_seed():
    """Every test starts from the same random state, so a failure reproduces alone."""
    torch.manual_seed(0)
    yield


# --------------------------------------------------------------------------- shared helpers
# Imported by the core test files as ``from conftest import ...`` (tests/ is on sys.path).

#: float64: tiles and the whole map run the same kernels on the same values; only the order
#: of a convolution's inner sum may differ with the window's shape, so errors are ~1e-15.
TIGHT = dict(rtol=1e-10, atol=1e-12)
#: float32: the same reorderings cost ~1e-6 relative per layer; a few layers stay under 1e-5.
FLOAT32 = dict(rtol=1e-5, atol=1e-5)


def run_both(model: torch.nn.Module, x: torch.Tensor, merge, tiles, **kw):
    """Transform ``model`` and return (tiled output, eager output, transformed gm)."""
    import tilefx

    gm = tilefx.transform(model, x, merge=merge, tiles=tiles, **kw)
    with torch.no_grad():
        return gm(x), model(x), gm


#: Deep real models in float32: a convolution's summation order differs between a tile and the
#: whole map (~1e-6 relative per layer), and these models run up to ~100 layers deep;
#: normalised activations keep the accumulated difference near 1e-5 of the output's scale.
ZOO_RTOL, ZOO_ATOL_REL = 1e-4, 1e-4


def assert_same_outputs(gm: torch.nn.Module, model: torch.nn.Module, x: torch.Tensor) -> None:
    """Every tensor ``gm(x)`` returns equals ``model(x)``'s, within the zoo tolerance (per
    output: ``rtol=ZOO_RTOL, atol=ZOO_ATOL_REL * max|want|``)."""
    from torch.utils._pytree import tree_flatten

    def flat(out):
        return [t for t in tree_flatten(out)[0] if isinstance(t, torch.Tensor)]

    with torch.no_grad():
        want, got = flat(model(x)), flat(gm(x))
    assert len(got) == len(want), f"{len(got)} outputs, the model returns {len(want)}"
    for g, w in zip(got, want):
        scale = w.abs().max().item() or 1.0
        torch.testing.assert_close(g, w, rtol=ZOO_RTOL, atol=ZOO_ATOL_REL * scale)
