"""The PPO stage: policy and reference from an SFT run, reward model and value model (fresh head) from a
reward run; `steps.ppo.ppo_iteration` jitted once is the step. `Parts` for the driver."""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import numpy as np

from jaxalign import sharding
from jaxalign.data import datasets
from jaxalign.data.prompts import PromptIterator, pad_id, stop_ids
from jaxalign.errors import ConfigError
from jaxalign.loops import driver, setup
from jaxalign.loops.sampled_eval import SampledEval
from jaxalign.models import build as build_models
from jaxalign.rewards import functions as reward_functions
from jaxalign.steps import ppo as ppo_steps


def rollout_settings(config):
  """The sampler's settings: prompts of rollout.prompt_len tokens, answers filling the rest of train.seq_len."""
  r = config.rollout
  new = config.train.seq_len - r.prompt_len
  if new < 1:
    raise ConfigError(f"train.seq_len={config.train.seq_len} leaves no room for a response after "
                     f"rollout.prompt_len={r.prompt_len}: train.seq_len is the prompt plus the response")
  return _Rollout(int(r.prompt_len), int(new), float(r.temperature), int(r.top_k), float(r.top_p))


class _Rollout(NamedTuple):
  """Immutable sampler settings (what `steps.policy.sample` reads)."""

  prompt_len: int
  max_new_tokens: int
  temperature: float
  top_k: int
  top_p: float


def prompt_spec(config, mesh, rows: int | None = None) -> dict:
  b = config.train.batch_size if rows is None else rows
  return setup.batch_spec(mesh, {"prompts": ((b, config.rollout.prompt_len), np.int32),
                                 "prompt_mask": ((b, config.rollout.prompt_len), np.int32)})


def prompt_data(config, tok, workdir):
  """Train prompt iterator, eval prompts; the data report written."""
  train, evals, reports = datasets.prompt_examples(config, tok, config.rollout.prompt_len)
  setup.write_reports(workdir, reports)
  it = PromptIterator(train, batch_size=config.train.batch_size, prompt_len=config.rollout.prompt_len,
                      seed=config.seed, pad_id=tok.pad_token_id)
  return it, evals


def jit_iteration(state, mesh, model_cfg, config, rollout_cfg, policy_opt, value_opt, tok):
  """`steps.ppo.ppo_iteration` jitted once (explicit shardings, the state donated); `*_opt` = (tx, schedule)."""
  return driver.jit_step(functools.partial(
      ppo_steps.ppo_iteration, cfg=model_cfg, ppo_cfg=config.ppo, rollout_cfg=rollout_cfg,
      stop_ids=stop_ids(tok, model_cfg), pad_id=pad_id(tok, model_cfg), policy_tx=policy_opt[0],
      value_tx=value_opt[0], policy_schedule=policy_opt[1], value_schedule=value_opt[1]), state, mesh)


def build(config, workdir: str, *, mesh=None, abstract: bool = False) -> driver.Parts:
  if not config.reward.init and not abstract:
    raise ConfigError("PPO needs reward.init: a reward-model run directory or HF sequence-classification model")
  if config.env.name:  # A value model over observation tokens is not built; GRPO needs none.
    raise ConfigError(f"env.name={config.env.name!r}: multi-turn episodes are built for GRPO and evaluate, not PPO "
                      "(use configs/grpo.py)")
  ro = rollout_settings(config)
  mesh, tok, model_cfg, params, source = setup.prepare(config, workdir, mesh=mesh, abstract=abstract)
  frozen, sources = setup.load_frozen(config, model_cfg, mesh, reference=True, reward=True, abstract=abstract)
  sources["model"] = source
  value_init = config.value.init or config.reward.init
  vparams, sources["value"] = setup.load_model(value_init, model_cfg, mesh, jax.random.PRNGKey(config.seed + 1),
                                               with_head=True, key="value.init", abstract=abstract)
  if not abstract:  # A fresh value head on the reward model's decoder.
    vparams["head"] = build_models.init_head_sharded(model_cfg, mesh, jax.random.PRNGKey(config.seed + 2))
  p = config.ppo
  updates = config.train.steps * p.epochs * p.minibatches
  pol_tx, pol_sched = setup.optimizer(config, params, updates)
  val_ocfg = config.optimizer.copy_and_resolve_references()
  with val_ocfg.unlocked():
    val_ocfg.learning_rate = config.value.learning_rate or config.optimizer.learning_rate
    val_ocfg.freeze = ()
  val_tx, val_sched = setup.optimizer(config, vparams, updates, val_ocfg)
  make = functools.partial(ppo_steps.create_state, policy_tx=pol_tx, value_tx=val_tx, seed=config.seed,
                           kl_coef=p.kl_coef, frozen=None)
  if abstract:
    opt_state = {"policy": setup.abstract_opt_state(pol_tx, params, mesh),
                 "value": setup.abstract_opt_state(val_tx, vparams, mesh)}
    kl_coef = jax.ShapeDtypeStruct((), np.float32, sharding=sharding.replicated(mesh))
    state = setup.abstract_state({"model": params["model"], "value": vparams}, opt_state, mesh, frozen=frozen,
                                 extra={"kl_coef": kl_coef})
  else:
    state = jax.jit(make)(params, vparams)._replace(frozen=frozen)
  step = jit_iteration(state, mesh, model_cfg, config, ro, (pol_tx, pol_sched), (val_tx, val_sched), tok)
  parts = driver.Parts("ppo", state, step, None, mesh, baseline_eval=True,
                       programs={"iteration": (step, (state, prompt_spec(config, mesh)))},
                       compiles=step._cache_size)  # noqa: SLF001
  if abstract:
    return parts
  parts.batches, evals = prompt_data(config, tok, workdir)
  setup.record_run(workdir, config, model_cfg, sources)
  ev = SampledEval(config, tok, model_cfg, mesh, evals, frozen, ro,
                   reward_functions.load(config.reward.eval_functions), config.train.batch_size)
  parts.evaluate = ev.evaluate_fn(f"{workdir}/eval_samples.jsonl")
  if config.export.hf:
    parts.export = lambda st: setup.export_hf(workdir, model_cfg, st.params["model"], tok,
                                              dtype=config.export.dtype or None)
  return parts
