"""Examples -> static [B, T] batches: packed rows or padded rows in a few length buckets.

A batch is a dict of int32/float32 numpy arrays:
  tokens, positions, segment_ids   [B, T]   (segment 0 = padding; positions restart per segment)
  targets, weights                 [B, W]   (weights[j] = 1 where predicting targets[j] = tokens[T-W+j+1] is trained)
Targets and weights cover the last W <= T positions: padded rows cut off the leading columns that hold no
trained target in any row of the global batch (prompts), in steps of T / `window_parts`, so the step computes
logits only there (`loss_window`); packed rows keep W = T.
Order is a pure function of (seed, epoch), so the position (epoch, batch index) is all a resume needs.
Each process materialises only its own rows of every global batch.
"""

from __future__ import annotations

import dataclasses
from typing import Sequence

import jax
import numpy as np

from jaxalign.data.examples import Example

KEYS = ("tokens", "positions", "segment_ids", "targets", "weights")


def pack_rows(lengths: Sequence[int], order: Sequence[int], seq_len: int, open_rows: int = 8) -> list[list[int]]:
  """First-fit packing in the given order over a window of open rows (deterministic, order-preserving-ish)."""
  rows: list[list[int]] = []
  space: list[tuple[int, int]] = []  # (row index, free tokens) of open rows.
  for i in order:
    n = lengths[i]
    for j, (r, free) in enumerate(space):
      if n <= free:
        rows[r].append(i)
        space[j] = (r, free - n)
        break
    else:
      rows.append([i])
      space.append((len(rows) - 1, seq_len - n))
      if len(space) > open_rows:
        space.pop(0)
    space = [(r, f) for r, f in space if f > 0]
  return rows


def build_row(examples: Sequence[Example], seq_len: int) -> dict[str, np.ndarray]:
  """One row holding the given examples as segments 1, 2, ...; pad to seq_len."""
  row = {k: np.zeros(seq_len, np.float32 if k == "weights" else np.int32) for k in KEYS}
  at = 0
  for s, ex in enumerate(examples, start=1):
    n = len(ex.ids)
    if at + n > seq_len:
      raise ValueError(f"row overflow: {at} + {n} > {seq_len}")
    row["tokens"][at:at + n] = ex.ids
    row["positions"][at:at + n] = np.arange(n)
    row["segment_ids"][at:at + n] = s
    row["targets"][at:at + n - 1] = ex.ids[1:]
    row["weights"][at:at + n - 1] = ex.trained[1:]
    at += n
  return row


def stack_rows(rows: Sequence[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
  return {k: np.stack([r[k] for r in rows]) for k in rows[0]}


def bucket_for(length: int, buckets: Sequence[int]) -> int:
  for b in sorted(buckets):
    if length <= b:
      return b
  raise ValueError(f"length {length} exceeds the largest bucket {max(buckets)}")


def first_target(ex) -> int:
  """Row offset of the first trained target of an example laid out at 0 (len(ex) when none is trained); for a
  pair, the earlier of its two rows."""
  if hasattr(ex, "chosen"):
    return min(first_target(ex.chosen), first_target(ex.rejected))
  idx = np.flatnonzero(ex.trained[1:])
  return int(idx[0]) if idx.size else len(ex)


def loss_window(start: int, length: int, parts: int) -> int:
  """Columns W of targets/weights for a batch whose first trained target is at column `start`: the last W of
  `length` columns, W a multiple of length / parts (so at most `parts` shapes per row length); parts=0: W = T."""
  if parts <= 0 or length % parts:
    return length
  g = length // parts
  return max(g, length - (min(start, length) // g) * g)


def cut_window(batch: dict[str, np.ndarray], window: int) -> dict[str, np.ndarray]:
  """Keep the last `window` columns of targets and weights (the rest must carry no weight)."""
  t = batch["weights"].shape[-1]
  if window >= t:
    return batch
  if batch["weights"][..., :t - window].any():
    raise AssertionError(f"loss window {window} of {t} columns would drop trained targets")
  return {**batch, "targets": batch["targets"][..., t - window:], "weights": batch["weights"][..., t - window:]}


@dataclasses.dataclass
class BatchPlan:
  """The rows of every batch of one epoch, as example indices, each batch's row length and loss window."""

  batches: list[list[list[int]]]
  lengths: list[int]
  windows: list[int]


def plan_epoch(lengths: Sequence[int], *, batch_size: int, seq_len: int, seed: int, epoch: int, pack: bool,
               buckets: Sequence[int] = (), shuffle: bool = True, firsts: Sequence[int] | None = None,
               window_parts: int = 0) -> BatchPlan:
  """`firsts[i]`: example i's first trained target (`first_target`); with window_parts, padded batches get a
  loss window (the same on every process: the plan is global)."""
  n = len(lengths)
  order = np.random.default_rng([seed, epoch]).permutation(n) if shuffle else np.arange(n)
  if pack:
    rows = pack_rows(lengths, order, seq_len)
  else:
    rows = [[int(i)] for i in order]
  nb = len(rows) // batch_size
  batches = [rows[b * batch_size:(b + 1) * batch_size] for b in range(nb)]
  all_buckets = sorted(set(buckets) | {seq_len})
  blens = [seq_len if pack else bucket_for(max(sum(lengths[i] for i in r) for r in bt), all_buckets)
           for bt in batches]
  if pack or firsts is None:
    windows = list(blens)
  else:
    windows = [loss_window(min(firsts[r[0]] for r in bt), n, window_parts) for bt, n in zip(batches, blens)]
  return BatchPlan(batches, blens, windows)


def host_rows(global_batch: int) -> slice:
  """The rows of a global batch this process feeds."""
  p, n = jax.process_index(), jax.process_count()
  if global_batch % n:
    raise ValueError(f"train.batch_size={global_batch} is not divisible by the {n} processes")
  per = global_batch // n
  return slice(p * per, (p + 1) * per)


class BatchIterator:
  """Endless, resumable iterator of this process's rows of each global batch."""

  def __init__(self, examples: Sequence[Example], *, batch_size: int, seq_len: int, seed: int, pack: bool,
               buckets: Sequence[int] = (), epoch: int = 0, index: int = 0, window_parts: int = 0):
    self.examples = examples
    self.lengths = [len(e) for e in examples]
    firsts = [first_target(e) for e in examples] if window_parts and not pack else None
    self.kw = dict(batch_size=batch_size, seq_len=seq_len, seed=seed, pack=pack, buckets=buckets,
                   firsts=firsts, window_parts=window_parts)
    self.epoch, self.index = epoch, index
    self._plan = None
    self._plan_epoch = None
    if not self._get_plan().batches:
      raise ValueError(f"{len(examples)} examples make no full batch of train.batch_size={batch_size} rows "
                       f"(seq_len={seq_len}, pack={pack}); lower the batch size or add data")

  def _get_plan(self) -> BatchPlan:
    if self._plan_epoch != self.epoch:
      self._plan = plan_epoch(self.lengths, epoch=self.epoch, **self.kw)
      self._plan_epoch = self.epoch
    return self._plan

  def state(self) -> dict:
    return {"epoch": self.epoch, "index": self.index}

  def restore(self, state: dict):
    self.epoch, self.index = int(state["epoch"]), int(state["index"])

  def batches_per_epoch(self) -> int:
    return len(self._get_plan().batches)

  def __iter__(self):
    return self

  def __next__(self) -> dict[str, np.ndarray]:
    plan = self._get_plan()
    if self.index >= len(plan.batches):
      self.epoch, self.index = self.epoch + 1, 0
      plan = self._get_plan()
    rows = plan.batches[self.index][host_rows(self.kw["batch_size"])]
    length, window = plan.lengths[self.index], plan.windows[self.index]
    self.index += 1
    return cut_window(self._build(rows, length), window)

  def _build(self, rows: list[list[int]], length: int) -> dict[str, np.ndarray]:
    return stack_rows([build_row([self.examples[i] for i in r], length) for r in rows])


def eval_batches(examples: Sequence[Example], *, batch_size: int, seq_len: int, buckets: Sequence[int] = (),
                 max_batches: int = 0, window_parts: int = 0):
  """Every eval example once, padded one per row, in a fixed order; the last batch filled with empty rows."""
  order = sorted(range(len(examples)), key=lambda i: len(examples[i]))  # Similar lengths share a bucket.
  all_buckets = sorted(set(buckets) | {seq_len})
  sl = host_rows(batch_size)
  out = []
  for b in range(0, len(order), batch_size):
    idx = order[b:b + batch_size]
    length = bucket_for(max(len(examples[i]) for i in idx), all_buckets)
    rows = [build_row([examples[i]], length) for i in idx]
    rows += [build_row([], length)] * (batch_size - len(rows))
    window = loss_window(min(first_target(examples[i]) for i in idx), length, window_parts)
    out.append(cut_window(stack_rows(rows[sl]), window))
    if max_batches and len(out) >= max_batches:
      break
  return out


def pair_batch(pairs, length: int) -> dict[str, np.ndarray]:
  """[B, 2, T] arrays (chosen, rejected), plus margin [B] and, when precomputed, ref_logps [B, 2]."""
  rows = [stack_rows([build_row([p.chosen], length), build_row([p.rejected], length)]) if p is not None
          else stack_rows([build_row([], length)] * 2) for p in pairs]
  out = stack_rows(rows)
  out["margin"] = np.asarray([p.margin if p is not None else 0.0 for p in pairs], np.float32)
  out["valid"] = np.asarray([p is not None for p in pairs], np.float32)
  if any(p is not None and p.label is not None for p in pairs):
    out["label"] = np.asarray([p.label if p is not None and p.label is not None else 0.0 for p in pairs], np.float32)
  if any(p is not None and p.ref is not None for p in pairs):
    out["ref_logps"] = np.stack([p.ref if p is not None else np.zeros(2, np.float32) for p in pairs])
  return out


class PairIterator(BatchIterator):
  """Endless, resumable iterator of preference-pair batches (padded into buckets; pairs are never packed)."""

  def __init__(self, pairs, *, batch_size: int, seq_len: int, seed: int, buckets: Sequence[int] = (),
               window_parts: int = 0):
    super().__init__(pairs, batch_size=batch_size, seq_len=seq_len, seed=seed, pack=False, buckets=buckets,
                     window_parts=window_parts)

  def _build(self, rows: list[list[int]], length: int) -> dict[str, np.ndarray]:
    return pair_batch([self.examples[r[0]] for r in rows], length)


def eval_pair_batches(pairs, *, batch_size: int, seq_len: int, buckets: Sequence[int] = (), max_batches: int = 0,
                      window_parts: int = 0):
  order = sorted(range(len(pairs)), key=lambda i: len(pairs[i]))
  all_buckets = sorted(set(buckets) | {seq_len})
  sl = host_rows(batch_size)
  out = []
  for b in range(0, len(order), batch_size):
    idx = order[b:b + batch_size]
    length = bucket_for(max(len(pairs[i]) for i in idx), all_buckets)
    chunk = [pairs[i] for i in idx] + [None] * (batch_size - len(idx))
    window = loss_window(min(first_target(pairs[i]) for i in idx), length, window_parts)
    out.append(cut_window(pair_batch(chunk[sl], length), window))
    if max_batches and len(out) >= max_batches:
      break
  return out
