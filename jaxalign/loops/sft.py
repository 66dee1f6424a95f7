"""The SFT stage: data -> sharded model -> `steps.sft.sft_step` -> HF export, as `Parts` for the driver."""

from __future__ import annotations

import functools
import math

import numpy as np

from jaxalign.data import batching, datasets
from jaxalign.loops import driver, setup
from jaxalign.steps import sft as sft_steps


def build(config, workdir: str, *, mesh=None, abstract: bool = False) -> driver.Parts:
  mesh, tok, model_cfg, params, source = setup.prepare(config, workdir, mesh=mesh, abstract=abstract)
  tx, sched = setup.optimizer(config, params, config.train.steps)
  state = setup.new_state(params, tx, config.seed, mesh, abstract=abstract)
  step = driver.jit_step(functools.partial(sft_steps.sft_step, model_cfg=model_cfg, tx=tx, schedule=sched,
                                           grad_accum=config.train.grad_accum, loss_spike=config.train.loss_spike),
                         state, mesh)
  b, t = config.train.batch_size, config.train.seq_len
  spec = setup.batch_spec(mesh, {k: ((b, t), np.float32 if k == "weights" else np.int32) for k in batching.KEYS})
  parts = driver.Parts("sft", state, step, None, mesh, programs={"train_step": (step, (state, spec))},
                       compiles=step._cache_size)  # noqa: SLF001 - the documented way to count jit cache entries.
  if abstract:
    return parts
  train, evals, reports = datasets.sft_examples(config, tok)
  setup.write_reports(workdir, reports)
  setup.record_run(workdir, config, model_cfg, {"model": source})
  d = config.data
  parts.batches = batching.BatchIterator(train, batch_size=b, seq_len=t, seed=config.seed, pack=d.pack,
                                         buckets=tuple(d.buckets), window_parts=d.loss_window)
  ev = batching.eval_batches(evals, batch_size=config.eval.batch_size, seq_len=t, buckets=tuple(d.buckets),
                             max_batches=config.eval.max_batches, window_parts=d.loss_window)
  parts.evaluate = setup.batch_evaluator(functools.partial(sft_steps.sft_eval, model_cfg=model_cfg), _eval_metrics,
                                         ev, driver.state_shardings(state, mesh), mesh)
  if config.export.hf:
    parts.export = lambda st: setup.export_hf(workdir, model_cfg, st.params["model"], tok,
                                              dtype=config.export.dtype or None)
  return parts


def _eval_metrics(s: dict) -> dict:
  loss = s["loss_sum"] / max(s["tokens"], 1)
  return {"loss": loss, "ppl": math.exp(min(loss, 50)), "tokens": s["tokens"]}
