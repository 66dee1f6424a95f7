"""Python reward functions: `fn(prompts, completions, **columns) -> list[float | None]` (TRL's signature),
named on the CLI as 'module:function', run on the host between the jitted rollout and update.

`prompts` are the records' prompts exactly as written (text, or a list of messages), the same in training and
in evaluation; every other column of the record arrives as a keyword list aligned with the completions (the
G completions of a prompt repeat its values), so a function can read the row's reference answer or tests. A
function receives the columns its signature names, or all of them if it takes `**kwargs`. `None` means "not
applicable": that value is left out of the function's mean and contributes nothing to the total reward.
"""

from __future__ import annotations

import importlib
import inspect
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


def accepted(fn: Callable, columns: dict) -> dict:
  """The columns `fn` can take: those its signature names, or all with **kwargs."""
  try:
    params = inspect.signature(fn).parameters.values()
  except (TypeError, ValueError):  # A builtin or C callable: give it none.
    return {}
  if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params):
    return dict(columns)
  names = {p.name for p in params if p.kind in (inspect.Parameter.KEYWORD_ONLY,
                                                 inspect.Parameter.POSITIONAL_OR_KEYWORD)}
  return {k: v for k, v in columns.items() if k in names}


def values(functions, prompts: list, completions: list[str], columns: dict | None = None) -> np.ndarray:
  """[n, F] float32: each function's reward for each completion; NaN where it returned None."""
  out = np.zeros((len(completions), len(functions)), np.float32)
  columns = columns or {}
  for i, (name, f, _) in enumerate(functions):
    raw = list(f(prompts, completions, **accepted(f, columns)))
    if len(raw) != len(completions):
      raise ValueError(f"reward function {name} returned {len(raw)} values for {len(completions)} completions")
    out[:, i] = np.asarray([np.nan if v is None else float(v) for v in raw], np.float32)
  return out


def expand(examples: list, group: int) -> tuple[list, dict]:
  """(prompts, columns) for `group` completions per example (rows i * group + j), from prompt examples that
  carry the record's `text` and `columns` (data.datasets.prompt_examples)."""
  prompts = [e.text for e in examples for _ in range(group)]
  keys = sorted({k for e in examples for k in getattr(e, "columns", {})})
  columns = {k: [getattr(e, "columns", {}).get(k) for e in examples for _ in range(group)] for k in keys}
  return prompts, columns
