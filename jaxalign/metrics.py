"""Metric writers (stdout, WORKDIR/metrics.jsonl, TensorBoard) and a one-step-late device fetch."""

from __future__ import annotations

import io
import json
import logging
import math
import time
from typing import Any

import jax
import numpy as np

from jaxalign import paths


def _scalar(v) -> Any:
  v = np.asarray(v)
  return v.item() if v.size == 1 else v.tolist()


class RemoteLines:
  """An append-only text file in a bucket, where objects cannot be appended to: the file's text is kept and
  the whole object rewritten at `flush` (at most every `every_s` seconds on `write`, and at each checkpoint
  save and `close`). A hard kill loses only rows written since the last flush: rows of steps after the last
  checkpoint, which the resumed run replays."""

  def __init__(self, path: str, every_s: float = 30.0):
    self.path, self.every_s = path, every_s
    self._buf = io.StringIO()
    if paths.exists(path):
      self._buf.write(paths.read_text(path))
    self._dirty = False
    self._last = time.monotonic()

  def write(self, text: str):
    self._buf.write(text)
    self._dirty = True
    if time.monotonic() - self._last >= self.every_s:
      self.flush()

  def flush(self):
    if self._dirty:
      paths.write_text(self.path, self._buf.getvalue())
      self._dirty = False
    self._last = time.monotonic()

  def close(self):
    self.flush()


class MetricWriter:
  """Every stage writes the same JSONL lines: step, stage, split and the metrics (process 0 only).

  In a bucket workdir metrics.jsonl is a `RemoteLines`, and TensorBoard event files go straight to gs:// (or
  s3://) through tensorboardX's own writers (google-cloud-storage, boto3); where that fails TensorBoard is
  turned off with a warning, never the run."""

  def __init__(self, workdir: str, stage: str, tensorboard: bool = True):
    self.stage = stage
    self._workdir = workdir
    self.active = jax.process_index() == 0
    self._f = None
    self._tb = None
    if self.active:
      paths.makedirs(workdir)
      jsonl = paths.join(workdir, "metrics.jsonl")
      self._f = RemoteLines(jsonl) if paths.is_remote(workdir) else open(jsonl, "a")
      if tensorboard:
        try:
          from tensorboardX import SummaryWriter
          self._tb = SummaryWriter(paths.join(workdir, "tensorboard"))
        except Exception as e:  # TensorBoard is a convenience; never fail a run for it.
          logging.warning("tensorboard disabled: %s", e)

  def write(self, step: int, split: str, metrics: dict[str, Any], echo: bool = True):
    if not self.active:
      return
    row = {"step": int(step), "stage": self.stage, "split": split}
    row.update({k: _scalar(v) for k, v in metrics.items()})
    self._f.write(json.dumps(row) + "\n")
    if not isinstance(self._f, RemoteLines):
      self._f.flush()
    if self._tb is not None:
      for k, v in row.items():
        if isinstance(v, (int, float)) and k != "step" and math.isfinite(v):
          self._tb.add_scalar(f"{split}/{k}".replace("@", "_at_"), v, step)  # TensorBoard refuses '@'.
    if echo:
      shown = " ".join(f"{k}={_fmt(v)}" for k, v in row.items() if k not in ("stage", "split", "step"))
      logging.info("[%s %s] step %d %s", self.stage, split, step, shown)

  def resume_at(self, step: int):
    """Drop this stage's rows of steps after `step`: a run resumed from the checkpoint at `step` replays
    them, and metrics.jsonl must hold each step once (rows of other stages sharing the file are kept)."""
    if not self.active:
      return
    path = paths.join(self._workdir, "metrics.jsonl")
    text = self._f._buf.getvalue() if isinstance(self._f, RemoteLines) else paths.read_text(path)
    lines = text.splitlines(keepends=True)
    kept = [ln for ln in lines if not _replayed(ln, self.stage, step)]
    if len(kept) == len(lines):
      return
    logging.info("metrics.jsonl: dropped %d rows after step %d (replayed by the resumed run)",
                 len(lines) - len(kept), step)
    if isinstance(self._f, RemoteLines):
      self._f._buf = io.StringIO("".join(kept))
      self._f._buf.seek(0, io.SEEK_END)
      self._f._dirty = True
      self._f.flush()
    else:
      self._f.close()
      paths.write_text(path, "".join(kept))
      self._f = open(path, "a")

  def flush(self):
    """Make every row written so far durable (a bucket workdir's metrics.jsonl is uploaded)."""
    if self._f:
      self._f.flush()

  def close(self):
    if self._f:
      self._f.close()
    if self._tb is not None:
      self._tb.close()


def _replayed(line: str, stage: str, step: int) -> bool:
  try:
    row = json.loads(line)
  except ValueError:  # A line cut by a hard kill: drop it too.
    return True
  return row.get("stage") == stage and int(row.get("step", 0)) > step


def _fmt(v) -> str:
  if isinstance(v, float):
    return f"{v:.4g}"
  return str(v)


class Throughput:
  """Tokens/s and steps/s over the interval since the last call."""

  def __init__(self):
    self.t = time.perf_counter()
    self.tokens = 0
    self.steps = 0

  def add(self, tokens: int):
    self.tokens += tokens
    self.steps += 1

  def pop(self) -> dict[str, float]:
    now = time.perf_counter()
    dt = max(now - self.t, 1e-9)
    out = {"tokens_per_s": self.tokens / dt, "steps_per_s": self.steps / dt}
    self.t, self.tokens, self.steps = now, 0, 0
    return out


def local_rows(x) -> np.ndarray:
  """This process's rows of a batch-sharded global array (the rows it fed), as numpy.

  Why: a multi-process array cannot be fetched whole; each host decodes and scores its own rows.
  """
  if x.is_fully_addressable:
    return np.asarray(x)
  parts = {}
  for s in x.addressable_shards:
    parts.setdefault(s.index[0].start or 0, s.data)
  return np.concatenate([np.asarray(parts[k]) for k in sorted(parts)])


def to_host(x) -> np.ndarray:
  """A whole global array as numpy on every process (an all-gather when it spans processes)."""
  if isinstance(x, jax.Array) and not x.is_fully_addressable:
    from jax.experimental import multihost_utils
    x = multihost_utils.process_allgather(x, tiled=True)
  return np.asarray(x)


def fetch(tree):
  """Device -> host for a small metrics tree (one transfer)."""
  return jax.tree.map(lambda x: np.asarray(x), jax.device_get(tree))
