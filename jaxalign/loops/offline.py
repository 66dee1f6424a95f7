"""The offline loop shared by SFT, reward modelling and DPO, and the SFT stage's setup.

`fit` is the one loop: resume, jitted step with explicit shardings and donation, metrics fetched one step
late, eval, checkpoints (with data position and RNG), SIGTERM handling, export. Stages differ only in the
step and eval functions and in what they export.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import math
import os
import signal
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from jaxalign import checkpoint, sharding
from jaxalign.checkpoint import Checkpointer, abstract_like
from jaxalign.data import batching, pipeline, tokenize
from jaxalign.loops import setup
from jaxalign.metrics import MetricWriter, Throughput, fetch
from jaxalign.models import hf
from jaxalign.optim import make_optimizer
from jaxalign.steps import sft as sft_steps
from jaxalign.steps.state import TrainState, create


class NonFiniteError(FloatingPointError):
  """A non-finite loss or gradient under train.nan_policy=stop."""


class Preempted(Exception):
  """SIGTERM received: the loop saved a checkpoint and stopped."""


@dataclasses.dataclass
class Stage:
  """What a stage plugs into `fit`: pure step/eval functions and how to export its result."""

  name: str
  step_fn: Callable  # (state, batch) -> (state, metrics)
  eval_fn: Callable | None  # (state, batch) -> dict of sums
  eval_metrics: Callable[[dict], dict] | None  # sums -> metrics
  export: Callable[[TrainState, str], None] | None = None  # (state, directory)


class _SigTerm:
  """Turns SIGTERM (TPU/SLURM preemption notice) into a flag the loop checks between steps."""

  def __init__(self):
    self.flag = False
    self._old = None

  def __enter__(self):
    try:
      self._old = signal.signal(signal.SIGTERM, self._handle)
    except ValueError:  # Not the main thread.
      self._old = None
    return self

  def _handle(self, signum, frame):
    del signum, frame
    logging.warning("SIGTERM received: finishing this step, saving a checkpoint, then exiting")
    self.flag = True

  def __exit__(self, *exc):
    if self._old is not None:
      signal.signal(signal.SIGTERM, self._old)


def to_device(batch: dict[str, np.ndarray], mesh) -> dict[str, jax.Array]:
  """This process's rows -> global arrays sharded over (data, fsdp)."""
  return {k: jax.make_array_from_process_local_data(sharding.batch_sharding(mesh, v.ndim), v)
          for k, v in batch.items()}


def state_shardings(state: TrainState, mesh):
  """Each leaf keeps the sharding it was created with; scalars replicated."""
  rep = sharding.replicated(mesh)
  return jax.tree.map(lambda x: x.sharding if hasattr(x, "sharding") and x.ndim else rep, state)


def fit(config, workdir: str, stage: Stage, state: TrainState, mesh, train_iter: batching.BatchIterator,
        eval_set: list[dict], writer: MetricWriter) -> TrainState:
  """Train `state` for train.steps with resume, eval, checkpoints, NaN guard and preemption handling."""
  ckpt = Checkpointer(os.path.join(workdir, "checkpoints"), keep=config.checkpoint.keep,
                      best_metric=config.checkpoint.best_metric, best_mode=config.checkpoint.best_mode,
                      async_save=config.checkpoint.async_save)
  state_sh = state_shardings(state, mesh)
  latest = ckpt.latest_step()
  if latest is not None:
    abstract = abstract_like(state, state_sh)
    items, data_state = ckpt.restore(latest, {"params": abstract.params, "opt_state": abstract.opt_state,
                                              "meta": _meta(abstract)})
    state = _from_items(items, state.frozen)
    train_iter.restore(data_state["train"])
    logging.info("resumed from %s step %d (data epoch %d, batch %d)", ckpt.mngr.directory, latest,
                 train_iter.epoch, train_iter.index)
  start = int(jax.device_get(state.step))
  total = int(config.train.steps)

  batch_sh = sharding.batch_sharding(mesh)
  jit_step = jax.jit(stage.step_fn, in_shardings=(state_sh, batch_sh), out_shardings=(state_sh, None),
                     donate_argnums=(0,))
  jit_eval = jit_eval_acc = None
  if stage.eval_fn:  # Sums accumulate inside jit: no eager op on global arrays (multi-process safe).
    rep = sharding.replicated(mesh)
    jit_eval = jax.jit(stage.eval_fn, in_shardings=(state_sh, batch_sh), out_shardings=rep)
    jit_eval_acc = jax.jit(lambda st, b, acc: jax.tree.map(jnp.add, acc, stage.eval_fn(st, b)),
                           in_shardings=(state_sh, batch_sh, rep), out_shardings=rep, donate_argnums=(2,))

  def run_eval(st: TrainState, step: int) -> dict:
    if not eval_set or jit_eval is None:
      return {}
    sums = None
    for b in eval_set:
      sums = jit_eval(st, to_device(b, mesh)) if sums is None else jit_eval_acc(st, to_device(b, mesh), sums)
    m = stage.eval_metrics(fetch(sums))
    writer.write(step, "eval", m)
    return {f"eval/{k}": float(v) for k, v in m.items()}

  tput = Throughput()
  best, since_best = None, 0
  pending: tuple[int, Any] | None = None
  nan_policy = config.train.nan_policy
  if nan_policy not in ("stop", "skip"):
    raise ValueError(f"train.nan_policy={nan_policy!r}: expected stop | skip")
  progress = _progress(config, start, total)
  last_saved = latest

  def save(st: TrainState, step: int, metrics=None):
    nonlocal last_saved
    if last_saved == step:
      return
    ckpt.save(step, {"params": st.params, "opt_state": st.opt_state, "meta": _meta(st)},
              {"train": train_iter.state()}, metrics=metrics)
    last_saved = step

  def handle(done_step: int, m_dev):
    m = fetch(m_dev)
    if int(m.get("nonfinite", 0)):
      if nan_policy == "stop":
        ckpt.wait()
        raise NonFiniteError(
            f"non-finite loss or gradient at step {done_step} (loss={float(m['loss'])}); the update was not "
            f"applied and the last good checkpoint ({last_saved}) is intact; set train.nan_policy=skip to "
            "skip such batches")
      logging.warning("step %d: non-finite loss or gradient, update skipped", done_step)
    if done_step % config.logging.every == 0 or done_step == total:
      writer.write(done_step, "train", {**m, **tput.pop()})

  step = start
  seen_shapes: set[tuple[int, ...]] = set()  # (row length, loss window): one compile each.
  stop_at = min(total, start + config.train.run_steps) if config.train.run_steps else total
  with _SigTerm() as sig:
    while step < stop_at:
      host_batch = next(train_iter)
      seen_shapes.add((host_batch["tokens"].shape[1], host_batch["targets"].shape[-1]))
      tput.add(int((host_batch["segment_ids"] > 0).sum()) * jax.process_count())
      state, m = jit_step(state, to_device(host_batch, mesh))
      step += 1
      if pending is not None:
        handle(*pending)
      pending = (step, m)
      if progress:
        progress.update(1)
      eval_now = (config.eval.every and step % config.eval.every == 0) or step == total
      ev = {}
      if eval_now:
        handle(*pending)
        pending = None
        ev = run_eval(state, step)
        if config.checkpoint.best_metric and config.checkpoint.best_metric in ev:
          v = ev[config.checkpoint.best_metric]
          better = best is None or (v < best if config.checkpoint.best_mode == "min" else v > best)
          best, since_best = (v, 0) if better else (best, since_best + 1)
      if step % config.checkpoint.every == 0 or step in (total, stop_at) or sig.flag:
        if pending is not None:
          handle(*pending)
          pending = None
        save(state, step, ev or None)
      if config.checkpoint.early_stop and since_best >= config.checkpoint.early_stop:
        logging.info("early stop at step %d: %s did not improve for %d evals", step,
                     config.checkpoint.best_metric, since_best)
        save(state, step, ev or None)
        break
      if sig.flag:
        ckpt.close()
        writer.close()
        raise Preempted(f"preempted at step {step}: checkpoint saved in {workdir}/checkpoints; rerun the same "
                        "command to resume")
  if pending is not None:
    handle(*pending)
  if progress:
    progress.close()
  compiles = jit_step._cache_size()  # noqa: SLF001 - the documented way to count jit cache entries.
  writer.write(step, "summary", {"compiles": compiles, "buckets": len({s[0] for s in seen_shapes}),
                                 "shapes": len(seen_shapes),
                                 "skipped_updates": int(fetch(state.skipped))})
  ckpt.close()
  return state


def _meta(state) -> dict:
  return {"step": state.step, "rng": state.rng, "skipped": state.skipped, "loss_ema": state.loss_ema}


def _from_items(items: dict, frozen) -> TrainState:
  m = items["meta"]
  return TrainState(m["step"], items["params"], items["opt_state"], m["rng"], m["skipped"], m["loss_ema"], frozen)


def _progress(config, start: int, total: int):
  if not config.logging.progress or jax.process_index() != 0:
    return None
  try:
    from tqdm import tqdm
  except ImportError:
    return None
  return tqdm(total=total, initial=start, desc=config.stage, unit="step", dynamic_ncols=True, mininterval=2.0)


# ----------------------------------------------------------------------------------------------- stage setup

def prepare(config, workdir: str, *, with_head: bool = False):
  """Mesh, tokenizer, model config and params for a stage; writes run.json recording the sources."""
  mesh = setup.make_mesh(config)
  tok, tok_path = setup.load_tokenizer(config)
  model_cfg = setup.resolve_model_config(config.model.init, config.model, tok)
  setup.check_vocab(model_cfg, tok, "model.tokenizer")
  rng = jax.random.PRNGKey(config.seed)
  params, source = setup.load_model(config.model.init, model_cfg, mesh, rng, with_head=with_head)
  if jax.process_index() == 0:
    os.makedirs(workdir, exist_ok=True)
    tok.save_pretrained(os.path.join(workdir, "tokenizer"))
  return mesh, tok, model_cfg, params, source


def record_run(workdir: str, config, model_cfg, sources: dict, has_head: bool = False):
  checkpoint.write_run_info(workdir, {
      "stage": config.stage, "model_config": checkpoint.model_config_dict(model_cfg),
      "tokenizer": os.path.abspath(os.path.join(workdir, "tokenizer")), "has_head": has_head,
      "sources": sources, "config": config.to_dict(), "created": time.strftime("%Y-%m-%d %H:%M:%S")})


def write_reports(workdir: str, reports):
  import json
  if jax.process_index() == 0:
    with open(os.path.join(workdir, "data_report.json"), "w") as f:
      json.dump([r.summary() for r in reports], f, indent=2)


def sft_examples(config, tok):
  """Tokenised SFT train/eval examples and data reports."""
  d = config.data

  def make(row, where):
    ex = tokenize.sft_example(tok, row, _fmt_of(row), where, completion_only=d.completion_only, add_eos=d.add_eos)
    return tokenize.fit_length(ex, config.train.seq_len, d.too_long, where)

  return pipeline.train_eval(d, make, length=len, truncated=lambda e: e.truncated, seed=config.seed)


def _fmt_of(row: dict) -> str:
  if "messages" in row:
    return "messages"
  if "completion" in row:
    return "prompt_completion"
  return "text"


def train_sft(config, workdir: str) -> TrainState:
  """The SFT stage: data -> sharded model -> fit -> HF export."""
  mesh, tok, model_cfg, params, source = prepare(config, workdir)
  train, evals, reports = sft_examples(config, tok)
  write_reports(workdir, reports)
  for r in reports:
    logging.info("%s", r)
  tx, sched = make_optimizer(config.optimizer, params, config.train.steps)
  state = jax.jit(functools.partial(create, tx=tx, seed=config.seed))(params)
  record_run(workdir, config, model_cfg, {"model": source})
  d = config.data
  it = batching.BatchIterator(train, batch_size=config.train.batch_size, seq_len=config.train.seq_len,
                              seed=config.seed, pack=d.pack, buckets=tuple(d.buckets), window_parts=d.loss_window)
  ev = batching.eval_batches(evals, batch_size=config.eval.batch_size, seq_len=config.train.seq_len,
                             buckets=tuple(d.buckets), max_batches=config.eval.max_batches,
                             window_parts=d.loss_window)
  stage = Stage(
      "sft",
      functools.partial(sft_steps.sft_step, model_cfg=model_cfg, tx=tx, schedule=sched,
                        grad_accum=config.train.grad_accum, loss_spike=config.train.loss_spike),
      functools.partial(sft_steps.sft_eval, model_cfg=model_cfg),
      lambda s: {"loss": s["loss_sum"] / max(s["tokens"], 1), "ppl": math.exp(min(s["loss_sum"] / max(s["tokens"], 1), 50)),
                 "tokens": s["tokens"]})
  writer = MetricWriter(workdir, "sft", config.logging.tensorboard)
  state = fit(config, workdir, stage, state, mesh, it, ev, writer)
  if config.export.hf:
    export_hf(workdir, model_cfg, state.params["model"], tok, dtype=config.export.dtype or None)
  writer.close()
  return state


def export_hf(workdir: str, model_cfg, params, tok, head=None, dtype=None) -> str:
  """WORKDIR/export/hf as a transformers checkpoint; LoRA adapters are merged into the weights."""
  out = os.path.join(workdir, "export", "hf")
  if model_cfg.lora_rank:
    from jaxalign.models import lora
    params = jax.jit(lora.merge, static_argnums=0)(model_cfg, params)
    model_cfg = model_cfg.replace(lora_rank=0)
  hf.save_params(out, model_cfg, params, head=head, dtype=dtype, tokenizer=tok)
  logging.info("exported a Hugging Face checkpoint to %s", out)
  return out
