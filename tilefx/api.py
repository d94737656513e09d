"""The public entry points: transform(), explain(), compare()."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch.fx import GraphModule

from .errors import TilingError
from .passes.receptive_field import annotate
from .passes.tile_rewrite import tile_rewrite
from .trace import trace

__all__ = ["transform", "explain", "compare", "Comparison"]


def transform(model: torch.nn.Module, example_input: torch.Tensor | None = None, *,
              merge: Any = None, tiles: Any = None, halo: bool = True) -> GraphModule:
    gm = trace(model, example_input)
    annotate(gm, example_input)
    return tile_rewrite(gm, merge, tiles, halo=halo)


def explain(gm):
    pass


def compare(model, gm, x):
    pass
