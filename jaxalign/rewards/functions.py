"""Python reward functions: `fn(prompts, completions) -> list[float]` (TRL's signature), named on the CLI as
'module:function', run on the host between the jitted rollout and update."""

from __future__ import annotations

import importlib
from typing import Callable

import numpy as np


def load(specs, weights=()) -> list[tuple[str, Callable, float]]:
  """'module:function' names -> (name, fn, weight)."""
  out = []
  weights = list(weights) or [1.0] * len(specs)
  if len(weights) != len(specs):
    raise ValueError(f"reward.weights has {len(weights)} entries for {len(specs)} reward.functions")
  for spec, w in zip(specs, weights):
    mod, _, name = spec.partition(":")
    try:
      fn = getattr(importlib.import_module(mod), name)
    except (ImportError, AttributeError, ValueError) as e:
      raise ValueError(f"reward.functions: cannot import {spec!r} ({e})") from e
    out.append((spec.rsplit(":", 1)[-1], fn, float(w)))
  return out


def decode(tok, tokens: np.ndarray, mask: np.ndarray) -> list[str]:
  """Response token rows -> text (the masked tokens only, special tokens dropped)."""
  return [tok.decode(t[m > 0], skip_special_tokens=True) for t, m in zip(tokens, mask)]


def values(functions, prompts: list[str], completions: list[str]) -> np.ndarray:
  """[n, F] float32: each function's reward for each completion."""
  out = np.zeros((len(completions), len(functions)), np.float32)
  for i, (name, f, _) in enumerate(functions):
    v = np.asarray(f(prompts, completions), np.float32).reshape(-1)
    if v.shape[0] != len(completions):
      raise ValueError(f"reward function {name} returned {v.shape[0]} values for {len(completions)} completions")
    out[:, i] = v
  return out
