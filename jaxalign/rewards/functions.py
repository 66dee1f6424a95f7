"""Python reward functions: `fn(prompts, completions, **columns) -> list[float | None]` (TRL's signature),
named on the CLI as 'module:function', run on the host between the jitted rollout and update.

`prompts` are the records' prompts exactly as written (text, or a list of messages), the same in training and
in evaluation; every other column of the record arrives as a keyword list aligned with the completions (the
G completions of a prompt repeat its values), so a function can read the row's reference answer or tests. A
function receives the columns its signature names, or all of them if it takes `**kwargs`. `None` means "not
applicable": that value is left out of the function's mean and contributes nothing to the total reward.
"""

from __future__ import annotations

import collections
import concurrent.futures
import importlib
import inspect
import logging
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


FAILURES: collections.Counter = collections.Counter()  # Samples whose reward failed, by function (a metric).
_POOL = concurrent.futures.ThreadPoolExecutor(max_workers=4, thread_name_prefix="reward")


def values(functions, prompts: list, completions: list[str], columns: dict | None = None,
           timeout: float | None = None) -> np.ndarray:
  """[n, F] float32: each function's reward for each completion; NaN where it returned None or failed.

  A function that raises is retried one sample at a time, so a crash costs only the samples it crashes on;
  one that runs past `timeout` seconds costs this batch's values (its thread is left to finish; a verifier
  that runs code should bound it itself, as `verifiers.code_tests` does). Each failure is logged once per call
  and counted in FAILURES, never raised: a reward function never stops the run."""
  out = np.zeros((len(completions), len(functions)), np.float32)
  columns = columns or {}
  for i, (name, f, _) in enumerate(functions):
    cols = accepted(f, columns)
    try:
      raw = _call(f, prompts, completions, cols, timeout)
      if len(raw) != len(completions):
        raise ValueError(f"returned {len(raw)} values for {len(completions)} completions")
    except concurrent.futures.TimeoutError:
      logging.warning("reward function %s: no result within %.0f s; its %d samples get no reward", name, timeout,
                      len(completions))
      FAILURES[name] += len(completions)
      raw = [None] * len(completions)
    except Exception as e:  # Isolate the samples it fails on.
      logging.warning("reward function %s failed (%s: %s); scoring its samples one at a time", name,
                      type(e).__name__, str(e).splitlines()[0] if str(e) else "")
      raw = []
      for j in range(len(completions)):
        try:
          raw += list(_call(f, prompts[j:j + 1], completions[j:j + 1], {k: v[j:j + 1] for k, v in cols.items()},
                            timeout))[:1]
        except Exception:
          FAILURES[name] += 1
          raw.append(None)
    out[:, i] = np.asarray([np.nan if v is None else float(v) for v in raw], np.float32)
  return out


def _call(f, prompts, completions, cols, timeout):
  if timeout is None:
    return list(f(prompts, completions, **cols))
  return list(_POOL.submit(f, prompts, completions, **cols).result(timeout=timeout))


def expand(examples: list, group: int) -> tuple[list, dict]:
  """(prompts, columns) for `group` completions per example (rows i * group + j), from prompt examples that
  carry the record's `text` and `columns` (data.datasets.prompt_examples)."""
  prompts = [e.text for e in examples for _ in range(group)]
  keys = sorted({k for e in examples for k in getattr(e, "columns", {})})
  columns = {k: [getattr(e, "columns", {}).get(k) for e in examples for _ in range(group)] for k in keys}
  return prompts, columns
