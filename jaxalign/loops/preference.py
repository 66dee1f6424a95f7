"""The offline preference stages: reward model, DPO family, KTO. Same data pipeline, loop and checkpoints as SFT."""

from __future__ import annotations

import functools
import logging
import os

import jax
import numpy as np

from jaxalign.data import batching, pipeline, tokenize
from jaxalign.loops import setup
from jaxalign.loops.offline import Stage, export_hf, fit, prepare, record_run, to_device, write_reports
from jaxalign.metrics import MetricWriter
from jaxalign.models import hf
from jaxalign.optim import make_optimizer
from jaxalign.steps import dpo as dpo_steps
from jaxalign.steps import reward as reward_steps
from jaxalign.steps.state import create


def max_prompt_len(config) -> int:
  return config.data.max_prompt_len or config.train.seq_len // 2


def pair_examples(config, tok):
  """Preference pairs (from prompt/chosen/rejected, implicit-prompt, ranked or rated records)."""
  d = config.data

  def make(row, where):
    return tokenize.pair_example(tok, row, where, seq_len=config.train.seq_len, max_prompt_len=max_prompt_len(config),
                                 add_eos=d.add_eos, too_long=d.too_long)

  return pipeline.train_eval(d, make, length=len, truncated=lambda p: p.truncated, seed=config.seed)


def unpaired_examples(config, tok):
  """KTO: (prompt, completion, label) rows -> pairs of (completion, KL-baseline row) with labels."""
  ident = lambda row, where: (row, where)  # noqa: E731
  train, evals, reports = pipeline.train_eval(config.data, ident, length=lambda x: 0, truncated=lambda x: False,
                                              seed=config.seed)
  kw = dict(seq_len=config.train.seq_len, max_prompt_len=max_prompt_len(config), add_eos=config.data.add_eos)
  train, evals = tokenize.kto_examples(tok, train, **kw), tokenize.kto_examples(tok, evals, **kw) if evals else []
  for r, exs in zip(reports, (train, evals)):
    r.lengths = [len(e) for e in exs]
    r.truncated = sum(e.truncated for e in exs)
  return train, evals, reports


def _iterators(config, train, evals, window_parts: int = 0):
  """Pair batches; `window_parts` (DPO/KTO, which read targets) cuts targets/weights to the loss window."""
  buckets = tuple(config.data.buckets)
  it = batching.PairIterator(train, batch_size=config.train.batch_size, seq_len=config.train.seq_len,
                             seed=config.seed, buckets=buckets, window_parts=window_parts)
  ev = batching.eval_pair_batches(evals, batch_size=config.eval.batch_size, seq_len=config.train.seq_len,
                                  buckets=buckets, max_batches=config.eval.max_batches, window_parts=window_parts)
  return it, ev


def train_reward(config, workdir: str):
  """Reward model from an SFT run (or HF dir): Bradley-Terry on pairs; exports *ForSequenceClassification."""
  mesh, tok, model_cfg, params, source = prepare(config, workdir, with_head=True)
  train, evals, reports = pair_examples(config, tok)
  write_reports(workdir, reports)
  tx, sched = make_optimizer(config.optimizer, params, config.train.steps)
  state = jax.jit(functools.partial(create, tx=tx, seed=config.seed))(params)
  record_run(workdir, config, model_cfg, {"model": source}, has_head=True)
  it, ev = _iterators(config, train, evals)
  r = config.reward
  stage = Stage(
      "reward",
      functools.partial(reward_steps.reward_step, model_cfg=model_cfg, tx=tx, schedule=sched,
                        grad_accum=config.train.grad_accum, center_coef=r.center_coef, use_margin=r.use_margin,
                        loss_spike=config.train.loss_spike),
      functools.partial(reward_steps.reward_eval, model_cfg=model_cfg, center_coef=r.center_coef,
                        use_margin=r.use_margin),
      reward_steps.reward_eval_metrics)
  writer = MetricWriter(workdir, "reward", config.logging.tensorboard)
  state = fit(config, workdir, stage, state, mesh, it, ev, writer)
  if config.export.hf:
    export_hf(workdir, model_cfg, state.params["model"], tok, head=state.params["head"],
              dtype=config.export.dtype or None)
  writer.close()
  return state


def load_reference(config, model_cfg, mesh):
  """Reference params (reference.init, default model.init) and where they came from."""
  init = config.reference.init or config.model.init
  if not init:
    raise ValueError("DPO needs a reference: set model.init to an SFT run or HF checkpoint (or reference.init)")
  ref_cfg = setup.resolve_model_config(init, config.model).replace(lora_rank=0)
  if ref_cfg != model_cfg:
    raise ValueError(f"reference.init={init}: architecture differs from the policy's ({model_cfg.family}, "
                     f"{model_cfg.num_layers} layers, hidden {model_cfg.hidden_size}); DPO needs the same model")
  params, source = setup.load_model(init, model_cfg, mesh, jax.random.PRNGKey(0), key="reference.init")
  return params["model"], source


def precompute_reference(model_cfg, ref_params, pairs, mesh, batch_size: int, seq_len: int, buckets=()):
  """Store each pair's reference log-probs (chosen, rejected) in `pair.ref`: one pass, then the reference
  can be dropped for the rest of training."""
  if not pairs:
    return
  fn = jax.jit(lambda p, b: dpo_steps.response_logps(model_cfg, p, b)[0])
  order = sorted(range(len(pairs)), key=lambda i: len(pairs[i]))
  all_b = sorted(set(buckets) | {seq_len})
  sl = batching.host_rows(batch_size)
  for s in range(0, len(order), batch_size):
    idx = order[s:s + batch_size]
    length = batching.bucket_for(max(len(pairs[i]) for i in idx), all_b)
    chunk = [pairs[i] for i in idx] + [None] * (batch_size - len(idx))
    b = batching.pair_batch(chunk[sl], length)
    b.pop("ref_logps", None)
    out = fn(ref_params, to_device(b, mesh))
    host = np.asarray(hf._to_host(out))  # noqa: SLF001 - gathers across processes when needed.
    for j, i in enumerate(idx):
      pairs[i].ref = host[j].astype(np.float32)


def train_dpo(config, workdir: str):
  """DPO family (loss.type) or KTO on unpaired data, from an SFT checkpoint."""
  mesh, tok, model_cfg, params, source = prepare(config, workdir)
  kto = config.loss.type == "kto"
  train, evals, reports = (unpaired_examples if kto else pair_examples)(config, tok)
  write_reports(workdir, reports)
  sources = {"model": source}
  frozen = None
  if model_cfg.lora_rank and not config.reference.init and not config.reference.precompute:
    sources["reference"] = dict(source, note="the policy's base weights with LoRA adapters off")
  elif kto or config.loss.type not in dpo_steps.REFERENCE_FREE:
    ref, sources["reference"] = load_reference(config, model_cfg.replace(lora_rank=0), mesh)
    if config.reference.precompute:
      for exs in (train, evals):
        precompute_reference(model_cfg.replace(lora_rank=0), ref, exs, mesh, config.eval.batch_size, config.train.seq_len,
                             tuple(config.data.buckets))
      sources["reference"]["precomputed"] = True
      del ref
    else:
      frozen = {"reference": ref}
  tx, sched = make_optimizer(config.optimizer, params, config.train.steps)
  state = jax.jit(functools.partial(create, tx=tx, seed=config.seed))(params)
  state = state._replace(frozen=frozen)
  record_run(workdir, config, model_cfg, sources)
  it, ev = _iterators(config, train, evals, config.data.loss_window)
  step, evfn = (dpo_steps.kto_step, dpo_steps.kto_eval) if kto else (dpo_steps.dpo_step, dpo_steps.dpo_eval)
  stage = Stage(
      "dpo",
      functools.partial(step, model_cfg=model_cfg, loss_cfg=config.loss, tx=tx, schedule=sched,
                        grad_accum=config.train.grad_accum, loss_spike=config.train.loss_spike),
      functools.partial(evfn, model_cfg=model_cfg, loss_cfg=config.loss),
      dpo_steps.dpo_eval_metrics)
  writer = MetricWriter(workdir, "dpo", config.logging.tensorboard)
  state = fit(config, workdir, stage, state, mesh, it, ev, writer)
  if config.export.hf:
    export_hf(workdir, model_cfg, state.params["model"], tok, dtype=config.export.dtype or None)
  writer.close()
  logging.info("DPO (%s) finished: %s", config.loss.type, os.path.join(workdir, "checkpoints"))
  return state
