"""The reward-model stage: Bradley-Terry on preference pairs from an SFT run (or HF dir); exports
*ForSequenceClassification. `Parts` for the driver."""

from __future__ import annotations

import functools

import numpy as np

from jaxalign.data import batching, datasets
from jaxalign.loops import driver, setup
from jaxalign.steps import reward as reward_steps


def pair_spec(config, mesh, *, targets: bool = True, ref_logps: bool = False) -> dict:
  """Abstract [B, 2, T] pair batch (chosen, rejected) with margin and valid [B] (what `pair_batch` makes)."""
  b, t = config.train.batch_size, config.train.seq_len
  keys = batching.KEYS if targets else batching.KEYS[:3]
  shapes = {k: ((b, 2, t), np.float32 if k == "weights" else np.int32) for k in keys}
  shapes.update(margin=((b,), np.float32), valid=((b,), np.float32))
  if ref_logps:
    shapes["ref_logps"] = ((b, 2), np.float32)
  return setup.batch_spec(mesh, shapes)


def pair_iterators(config, train, evals, window_parts: int = 0):
  """Pair batches; `window_parts` (DPO/KTO, which read targets) cuts targets/weights to the loss window."""
  buckets = tuple(config.data.buckets)
  it = batching.PairIterator(train, batch_size=config.train.batch_size, seq_len=config.train.seq_len,
                             seed=config.seed, buckets=buckets, window_parts=window_parts)
  ev = batching.eval_pair_batches(evals, batch_size=config.eval.batch_size, seq_len=config.train.seq_len,
                                  buckets=buckets, max_batches=config.eval.max_batches, window_parts=window_parts)
  return it, ev


def build(config, workdir: str, *, mesh=None, abstract: bool = False) -> driver.Parts:
  mesh, tok, model_cfg, params, source = setup.prepare(config, workdir, with_head=True, mesh=mesh, abstract=abstract)
  tx, sched = setup.optimizer(config, params, config.train.steps)
  state = setup.new_state(params, tx, config.seed, mesh, abstract=abstract)
  r = config.loss
  step = driver.jit_step(functools.partial(reward_steps.reward_step, model_cfg=model_cfg, tx=tx, schedule=sched,
                                           grad_accum=config.train.grad_accum, center_coef=r.center_coef,
                                           use_margin=r.use_margin, loss_spike=config.train.loss_spike),
                         state, mesh)
  parts = driver.Parts("reward", state, step, None, mesh,
                       programs={"train_step": (step, (state, pair_spec(config, mesh)))},
                       compiles=step._cache_size)  # noqa: SLF001
  if abstract:
    return parts
  train, evals, reports = datasets.pair_examples(config, tok)
  setup.write_reports(workdir, reports)
  setup.record_run(workdir, config, model_cfg, {"model": source}, has_head=True)
  parts.batches, ev = pair_iterators(config, train, evals)
  parts.evaluate = setup.batch_evaluator(
      functools.partial(reward_steps.reward_eval, model_cfg=model_cfg, center_coef=r.center_coef,
                        use_margin=r.use_margin),
      reward_steps.reward_eval_metrics, ev, driver.state_shardings(state, mesh), mesh)
  if config.export.hf:
    parts.export = lambda st: setup.export_hf(workdir, model_cfg, st.params["model"], tok, head=st.params["head"],
                                              dtype=config.export.dtype or None)
  return parts
