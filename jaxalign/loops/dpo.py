"""The DPO-family stage (loss.type) and KTO on unpaired data, from an SFT checkpoint; `Parts` for the driver.

The reference is a frozen copy (state.frozen), precomputed log-probs in each pair (reference.precompute),
or for LoRA the policy with its adapters off."""

from __future__ import annotations

import functools
import logging

import jax
import numpy as np

from jaxalign.data import batching, datasets
from jaxalign.errors import ConfigError
from jaxalign.loops import driver, setup
from jaxalign.loops.reward import pair_iterators, pair_spec
from jaxalign.losses import preference
from jaxalign.metrics import to_host
from jaxalign.steps import dpo as dpo_steps


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
    host = to_host(fn(ref_params, driver.to_device(b, mesh)))
    for j, i in enumerate(idx):
      pairs[i].ref = host[j].astype(np.float32)


DRIFT_NATS = 5.0  # Warn when held-out chosen responses lose this much log-probability against the reference.


def _with_drift_warning(evaluate, beta: float):
  """Adds `chosen_logratio` (mean log pi(y_c) - log ref(y_c) over held-out pairs, nats per response) to each
  eval and warns when it falls below -DRIFT_NATS: the policy is moving probability away from the very
  responses it should prefer (likelihood displacement), while reward accuracy can still look healthy. The
  sign a small preference set with the default beta shows first (issue 21: KL ~11 nats, fluency 0.95 ->
  0.34, accuracy 0.77)."""

  def wrapped(state, step, final):
    m = evaluate(state, step, final)
    if "rewards/chosen" in m:
      m["chosen_logratio"] = m["rewards/chosen"] / beta
      if m["chosen_logratio"] < -DRIFT_NATS:
        logging.warning("step %d: held-out chosen responses are %.1f nats less likely than under the reference: "
                        "the policy is drifting from it (check samples); lower optimizer.learning_rate or raise "
                        "loss.beta", step, -m["chosen_logratio"])
    return m

  return wrapped


def build(config, workdir: str, *, mesh=None, abstract: bool = False) -> driver.Parts:
  kto = config.loss.type == "kto"
  if not kto and config.loss.type not in preference.LOSS_TYPES:
    raise ConfigError(f"loss.type={config.loss.type!r}: expected one of {', '.join(preference.LOSS_TYPES)} or kto")
  mesh, tok, model_cfg, params, source = setup.prepare(config, workdir, mesh=mesh, abstract=abstract)
  sources = {"model": source}
  frozen, ref, precompute = None, None, False
  if model_cfg.lora_rank and not config.reference.init and not config.reference.precompute:
    sources["reference"] = dict(source, note="the policy's base weights with LoRA adapters off")
  elif kto or config.loss.type not in dpo_steps.REFERENCE_FREE:
    fz, fsources = setup.load_frozen(config, model_cfg, mesh, reference=True, reward=False, abstract=abstract)
    ref, sources["reference"] = fz["reference"], fsources["reference"]
    precompute = bool(config.reference.precompute)
    if not precompute:
      frozen = {"reference": ref}
  tx, sched = setup.optimizer(config, params, config.train.steps)
  state = setup.new_state(params, tx, config.seed, mesh, frozen=frozen, abstract=abstract)
  step_fn, eval_fn = (dpo_steps.kto_step, dpo_steps.kto_eval) if kto else (dpo_steps.dpo_step, dpo_steps.dpo_eval)
  step = driver.jit_step(functools.partial(step_fn, model_cfg=model_cfg, loss_cfg=config.loss, tx=tx,
                                           schedule=sched, grad_accum=config.train.grad_accum,
                                           loss_spike=config.train.loss_spike), state, mesh)
  spec = pair_spec(config, mesh, ref_logps=precompute)
  if kto:
    spec["label"] = setup.batch_spec(mesh, {"label": ((config.train.batch_size,), np.float32)})["label"]
  parts = driver.Parts("dpo", state, step, None, mesh, programs={"train_step": (step, (state, spec))},
                       compiles=step._cache_size)  # noqa: SLF001
  if abstract:
    return parts
  train, evals, reports = (datasets.unpaired_examples if kto else datasets.pair_examples)(config, tok)
  setup.write_reports(workdir, reports)
  if precompute:
    for exs in (train, evals):
      precompute_reference(model_cfg.replace(lora_rank=0), ref, exs, mesh, config.eval.batch_size,
                           config.train.seq_len, tuple(config.data.buckets))
    sources["reference"]["precomputed"] = True
    del ref
  setup.record_run(workdir, config, model_cfg, sources)
  parts.batches, ev = pair_iterators(config, train, evals, config.data.loss_window)
  parts.evaluate = setup.batch_evaluator(functools.partial(eval_fn, model_cfg=model_cfg, loss_cfg=config.loss),
                                         dpo_steps.dpo_eval_metrics, ev, driver.state_shardings(state, mesh), mesh)
  if parts.evaluate is not None and not kto and config.loss.type not in dpo_steps.REFERENCE_FREE:
    parts.evaluate = _with_drift_warning(parts.evaluate, config.loss.beta)

  def export(st):
    if config.export.hf:
      setup.export_hf(workdir, model_cfg, st.params["model"], tok, dtype=config.export.dtype or None)
    logging.info("DPO (%s) finished: %s/checkpoints", config.loss.type, workdir)

  parts.export = export
  return parts
