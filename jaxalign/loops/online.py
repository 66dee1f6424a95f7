"""The online-RL loop (PPO, GRPO/RLOO): prompts -> rollout -> score -> advantages -> update, all jitted.

      prompts ──► generate (policy, KV cache) ──► old/ref log-probs ──► reward model / reward functions
         ▲                                                                        │
         └──── next batch ◄── epochs x minibatches (clipped losses) ◄── GAE / group advantages
"""

from __future__ import annotations

import dataclasses
import functools
import importlib
import logging
import os
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from jaxalign import sharding
from jaxalign.checkpoint import Checkpointer, abstract_like
from jaxalign.data import batching, pipeline, tokenize
from jaxalign.loops import setup
from jaxalign.loops.offline import (NonFiniteError, Preempted, _SigTerm, export_hf, prepare, record_run,
                                    write_reports)
from jaxalign.metrics import MetricWriter, fetch, local_rows
from jaxalign.models import build
from jaxalign.optim import make_optimizer
from jaxalign.steps import grpo as grpo_steps
from jaxalign.steps import ppo as ppo_steps
from jaxalign.steps.state import TrainState, create


# ----------------------------------------------------------------------------------------------- prompts

class PromptIterator:
  """Endless, resumable batches of left-padded prompts (this process's rows): tokens, mask [b, P]."""

  def __init__(self, prompts: list[np.ndarray], *, batch_size: int, prompt_len: int, seed: int, pad_id: int):
    self.prompts, self.b, self.p, self.seed, self.pad = prompts, batch_size, prompt_len, seed, pad_id
    self.epoch, self.index = 0, 0
    if len(prompts) < batch_size:
      raise ValueError(f"{len(prompts)} prompts make no batch of rollout.batch_size={batch_size}")

  def state(self) -> dict:
    return {"epoch": self.epoch, "index": self.index}

  def restore(self, st: dict):
    self.epoch, self.index = int(st["epoch"]), int(st["index"])

  def __next__(self):
    n = len(self.prompts) // self.b
    if self.index >= n:
      self.epoch, self.index = self.epoch + 1, 0
    order = np.random.default_rng([self.seed, self.epoch, 17]).permutation(len(self.prompts))
    idx = order[self.index * self.b:(self.index + 1) * self.b][batching.host_rows(self.b)]
    self.index += 1
    return left_pad([self.prompts[i].ids for i in idx], self.p, self.pad)


def left_pad(prompts: list[np.ndarray], length: int, pad_id: int):
  toks = np.full((len(prompts), length), pad_id, np.int32)
  mask = np.zeros((len(prompts), length), np.int32)
  for i, p in enumerate(prompts):
    p = p[-length:]
    toks[i, length - len(p):] = p
    mask[i, length - len(p):] = 1
  return toks, mask


def prompt_examples(config, tok):
  """Prompt ids from any record with a `prompt` field (prompt-only, SFT or preference data)."""
  d = config.data
  p_len = config.rollout.prompt_len

  def make(row, where):
    ids = tokenize.prompt_ids(tok, row["prompt"], where)
    ex = tokenize.Example(ids[-p_len:], np.zeros(min(len(ids), p_len), bool), truncated=len(ids) > p_len)
    ex.text = row["prompt"]
    return ex

  with d.unlocked():
    d.format = "prompt"
  return pipeline.train_eval(d, make, length=len, truncated=lambda e: e.truncated, seed=config.seed)


def stop_ids(tok, extra=()) -> tuple[int, ...]:
  ids = {tok.eos_token_id}
  for t in ("<|im_end|>", "<|eot_id|>", "<end_of_turn>", *extra):
    i = tok.convert_tokens_to_ids(t) if t in tok.get_vocab() else None
    if i is not None:
      ids.add(i)
  return tuple(sorted(i for i in ids if i is not None))


# ----------------------------------------------------------------------------------------------- rewards

def load_reward_functions(specs, weights) -> list[tuple[str, Callable, float]]:
  """'module:function' names -> (name, fn, weight). A function takes (prompts, completions) lists of str
  and returns a list of floats (TRL's reward-function signature)."""
  out = []
  weights = list(weights) or [1.0] * len(specs)
  if len(weights) != len(specs):
    raise ValueError(f"reward.weights has {len(weights)} entries for {len(specs)} reward.functions")
  for spec, w in zip(specs, weights):
    mod, _, name = spec.partition(":")
    try:
      fn = getattr(importlib.import_module(mod), name)
    except (ImportError, AttributeError) as e:
      raise ValueError(f"reward.functions: cannot import {spec!r} ({e})") from e
    out.append((spec.rsplit(":", 1)[-1], fn, float(w)))
  return out


def decode_responses(tok, tokens: np.ndarray, mask: np.ndarray) -> list[str]:
  return [tok.decode(t[m > 0], skip_special_tokens=True) for t, m in zip(tokens, mask)]


# ----------------------------------------------------------------------------------------------- setup

def _frozen_models(config, model_cfg, mesh, need_reference: bool):
  frozen, sources = {}, {}
  if need_reference:
    init = config.reference.init or config.model.init
    if not init:
      raise ValueError("online RL needs a reference: set model.init to an SFT run (or reference.init)")
    p, sources["reference"] = setup.load_model(init, model_cfg, mesh, jax.random.PRNGKey(0), key="reference.init")
    frozen["reference"] = p["model"]
  if config.reward.init:
    rcfg = setup.resolve_model_config(config.reward.init, config.model)
    if rcfg.vocab_size != model_cfg.vocab_size or rcfg.hidden_size != model_cfg.hidden_size or \
        rcfg.num_layers != model_cfg.num_layers:
      raise ValueError(f"reward.init={config.reward.init}: its architecture (vocab {rcfg.vocab_size}, hidden "
                       f"{rcfg.hidden_size}, {rcfg.num_layers} layers) does not match the policy's; the reward model "
                       "must share the policy's tokenizer and, in this version, its architecture")
    p, sources["reward"] = setup.load_model(config.reward.init, model_cfg, mesh, jax.random.PRNGKey(0),
                                            with_head=True, key="reward.init")
    frozen["reward"] = p
  return frozen, sources


def _writer_and_ckpt(config, workdir, stage):
  writer = MetricWriter(workdir, stage, config.logging.tensorboard)
  ckpt = Checkpointer(os.path.join(workdir, "checkpoints"), keep=config.checkpoint.keep,
                      async_save=config.checkpoint.async_save)
  return writer, ckpt


class Watchdog:
  """Warns on the usual signs of reward hacking: KL accelerating, entropy collapsing, length spiking."""

  def __init__(self):
    self.hist: dict[str, list[float]] = {}

  def check(self, it: int, m: dict):
    for k in ("kl", "entropy", "response_length"):
      if k in m:
        self.hist.setdefault(k, []).append(float(m[k]))
    kl, ent, ln = self.hist.get("kl", []), self.hist.get("entropy", []), self.hist.get("response_length", [])
    if len(kl) >= 3 and kl[-1] > 2 * max(kl[-2], 1e-3) and (kl[-1] - kl[-2]) > (kl[-2] - kl[-3]) > 0:
      logging.warning("iteration %d: KL to the reference is accelerating (%.3g -> %.3g): possible reward hacking; "
                      "raise the KL coefficient or lower the learning rate", it, kl[-2], kl[-1])
    if len(ent) >= 2 and ent[-1] < 0.2 * ent[0]:
      logging.warning("iteration %d: entropy collapsed to %.3g (from %.3g)", it, ent[-1], ent[0])
    if len(ln) >= 2 and ln[-1] > 2 * np.median(ln[: max(1, len(ln) // 2)]):
      logging.warning("iteration %d: response length spiked to %.1f tokens", it, ln[-1])


@dataclasses.dataclass
class Evaluator:
  """Samples on held-out prompts; scores with the reward model, reward functions and KL to the reference."""

  config: Any
  tok: Any
  model_cfg: Any
  mesh: Any
  prompts: list
  frozen: dict
  functions: list

  def __post_init__(self):
    r = self.config.rollout
    cfg = self.model_cfg
    stops, pad = stop_ids(self.tok), self.tok.pad_token_id

    def fn(params, frozen, toks, mask, key):
      s = ppo_steps.sampling.generate(cfg, params, toks, mask, key, max_new_tokens=r.max_new_tokens,
                                      temperature=r.temperature, top_k=r.top_k, top_p=r.top_p, stop_ids=stops,
                                      pad_id=pad)
      seq, pos, seg = ppo_steps.sampling.sequences(toks, mask, s)
      p = toks.shape[1]
      lp = ppo_steps.response_logprobs(cfg, params, seq, pos, seg, p, r.temperature)
      out = {"tokens": s.tokens, "mask": s.mask, "finished": s.finished}
      last = lp  # Each model's pass waits for the previous one (sharding.after).
      if "reference" in frozen:
        last = ppo_steps.response_logprobs(cfg, frozen["reference"], *sharding.after((seq, pos, seg), lp), p,
                                           r.temperature)
        out["kl"] = jnp.sum((lp - last) * s.mask, -1)
      if "reward" in frozen:
        out["score"] = ppo_steps.score_sequences(cfg, frozen["reward"], *sharding.after((seq, pos, seg), last))
      return out

    # Outputs replicated: every process sees every row (small), so metrics agree across processes.
    self._fn = jax.jit(fn, out_shardings=sharding.replicated(self.mesh))

  def __call__(self, params, step: int, writer: MetricWriter | None = None, samples_path: str | None = None):
    b = self.config.rollout.batch_size
    key = jax.random.PRNGKey(self.config.seed + 991)
    agg: dict[str, list] = {}
    texts = []
    n = min(len(self.prompts), self.config.eval.max_batches * b if self.config.eval.max_batches else len(self.prompts))
    for s in range(0, n - b + 1, b):
      chunk = self.prompts[s:s + b]
      toks, mask = left_pad([e.ids for e in chunk], self.config.rollout.prompt_len, self.tok.pad_token_id)
      sl = batching.host_rows(b)
      bs = sharding.batch_sharding(self.mesh)
      dev = [jax.make_array_from_process_local_data(bs, x[sl]) for x in (toks, mask)]
      out = fetch(self._fn(params, self.frozen, *dev, jax.random.fold_in(key, s)))
      comps = decode_responses(self.tok, out["tokens"], out["mask"])
      prompts_txt = [e.text if isinstance(e.text, str) else str(e.text) for e in chunk]
      for name, f, _ in self.functions:
        agg.setdefault(f"reward/{name}", []).extend(map(float, f(prompts_txt, comps)))
      for k in ("kl", "score"):
        if k in out:
          agg.setdefault(k, []).extend(map(float, out[k]))
      agg.setdefault("response_length", []).extend(map(float, out["mask"].sum(-1)))
      agg.setdefault("no_eos_fraction", []).extend(map(float, 1 - out["finished"]))
      for i, (p, c) in enumerate(zip(prompts_txt, comps)):
        texts.append({"prompt": p, "completion": c, **{k: v[-len(comps) + i] for k, v in agg.items()}})
    metrics = {k: float(np.mean(v)) for k, v in agg.items()}
    if writer is not None:
      writer.write(step, "eval", metrics)
    if samples_path and jax.process_index() == 0:
      import json
      with open(samples_path, "w") as f:
        for t in texts:
          f.write(json.dumps(t) + "\n")
    return metrics, texts


# ----------------------------------------------------------------------------------------------- loop

def _run(config, workdir: str, *, stage: str, init_items: dict, make_iteration: Callable, evaluator: Evaluator,
         prompt_iter: PromptIterator, mesh, export: Callable):
  """Shared driver: resume, iterate, log, eval, checkpoint, SIGTERM, export."""
  writer, ckpt = _writer_and_ckpt(config, workdir, stage)
  items = init_items
  shard = jax.tree.map(lambda x: x.sharding, items)
  latest = ckpt.latest_step()
  if latest is not None:
    items, data_state = ckpt.restore(latest, {k: abstract_like(v, shard[k]) for k, v in items.items()})
    prompt_iter.restore(data_state["train"])
    logging.info("resumed %s from step %d", stage, latest)
  it = int(fetch(items["meta"]["iteration"]))
  total = config.train.steps
  stop_at = min(total, it + config.train.run_steps) if config.train.run_steps else total
  watchdog = Watchdog()
  step_fn = make_iteration(items)
  if it == 0:  # The starting policy's eval row (step 0) is the baseline every later eval is read against.
    evaluator(_policy_params(items), 0, writer)
  with _SigTerm() as sig:
    while it < stop_at:
      toks, mask = next(prompt_iter)
      items, m = step_fn(items, toks, mask)
      it += 1
      if int(m.get("nonfinite", 0)):
        if config.train.nan_policy == "stop":
          ckpt.wait()
          raise NonFiniteError(f"non-finite loss or gradient at iteration {it}; the last good checkpoint is intact")
        logging.warning("iteration %d: non-finite update skipped", it)
      if it % config.logging.every == 0 or it == stop_at:
        writer.write(it, "train", m)
        watchdog.check(it, m)
      if config.eval.every and it % config.eval.every == 0 and it != total:
        evaluator(_policy_params(items), it, writer)
      if it % config.checkpoint.every == 0 or it in (stop_at, total) or sig.flag:
        ckpt.save(it, items, {"train": prompt_iter.state()})
      if sig.flag:
        ckpt.close()
        writer.close()
        raise Preempted(f"preempted at iteration {it}: checkpoint saved in {workdir}/checkpoints; rerun to resume")
  ckpt.close()
  if it >= total:
    evaluator(_policy_params(items), it, writer, os.path.join(workdir, "eval_samples.jsonl"))
    export(items)
    writer.write(it, "summary", {"compiles": step_fn.compiles()})
  writer.close()
  return items


def _policy_params(items):
  return items["params"]["model"]


def _make_meta(mesh, iteration=0, kl_coef=0.0, seed=0):
  meta = {"iteration": jnp.asarray(iteration, jnp.int32), "kl_coef": jnp.asarray(kl_coef, jnp.float32),
          "rng": jax.random.PRNGKey(seed)}
  return jax.device_put(meta, sharding.replicated(mesh))


def train_ppo(config, workdir: str):
  """PPO from an SFT run (policy + reference) and a reward run (reward; value with a fresh head)."""
  if not config.reward.init:
    raise ValueError("PPO needs reward.init: a reward-model run directory or HF sequence-classification model")
  mesh, tok, model_cfg, params, source = prepare(config, workdir)
  train, evals, reports = prompt_examples(config, tok)
  write_reports(workdir, reports)
  frozen, sources = _frozen_models(config, model_cfg, mesh, need_reference=True)
  sources["model"] = source
  value_init = config.value.init or config.reward.init
  vparams, sources["value"] = setup.load_model(value_init, model_cfg, mesh, jax.random.PRNGKey(config.seed + 1),
                                               with_head=True, key="value.init")
  vparams["head"] = build.init_head_sharded(model_cfg, mesh, jax.random.PRNGKey(config.seed + 2))  # Fresh head.
  pol_tx, pol_sched = make_optimizer(config.optimizer, params, config.train.steps * config.ppo.epochs *
                                     config.ppo.minibatches)
  val_ocfg = config.optimizer.copy_and_resolve_references()
  with val_ocfg.unlocked():
    val_ocfg.learning_rate = config.value.learning_rate or config.optimizer.learning_rate
    val_ocfg.freeze = ()
  val_tx, val_sched = make_optimizer(val_ocfg, vparams, config.train.steps * config.ppo.epochs * config.ppo.minibatches)
  pol = jax.jit(functools.partial(create, tx=pol_tx, seed=config.seed))(params)
  val = jax.jit(functools.partial(create, tx=val_tx, seed=config.seed + 1))(vparams)
  record_run(workdir, config, model_cfg, sources)
  items = {"params": {"model": pol.params["model"], "value": val.params},
           "opt_state": {"policy": pol.opt_state, "value": val.opt_state},
           "meta": _make_meta(mesh, 0, config.ppo.kl_coef, config.seed)}
  stops, pad = stop_ids(tok), tok.pad_token_id
  pc, rc = config.ppo, config.rollout

  def iteration(items, frozen, toks, mask):
    m = items["meta"]
    polst = TrainState(jnp.zeros((), jnp.int32), {"model": items["params"]["model"]}, items["opt_state"]["policy"],
                       m["rng"], jnp.zeros((), jnp.int32), jnp.zeros((), jnp.float32), frozen)
    valst = TrainState(jnp.zeros((), jnp.int32), items["params"]["value"], items["opt_state"]["value"], m["rng"],
                       jnp.zeros((), jnp.int32), jnp.zeros((), jnp.float32))
    state = ppo_steps.PPOState(polst, valst, m["kl_coef"], m["iteration"])
    k1, k2, k3 = jax.random.split(jax.random.fold_in(m["rng"], m["iteration"]), 3)
    ro, em = ppo_steps.make_experience(state, toks, mask, k1, cfg=model_cfg, pcfg=pc, rcfg=rc, stop_ids=stops,
                                       pad_id=pad)
    state, um = ppo_steps.ppo_update(state, ro, k2, cfg=model_cfg, pcfg=pc, temperature=rc.temperature,
                                     pol_tx=pol_tx, val_tx=val_tx, pol_schedule=pol_sched, val_schedule=val_sched)
    new = {"params": {"model": state.policy.params["model"], "value": state.value.params},
           "opt_state": {"policy": state.policy.opt_state, "value": state.value.opt_state},
           "meta": {"iteration": state.iteration, "kl_coef": state.kl_coef, "rng": m["rng"]}}
    return new, {**em, **um}

  step = _Jitted(iteration, items, frozen, mesh)
  evaluator = Evaluator(config, tok, model_cfg, mesh, evals, frozen,
                        load_reward_functions(config.reward.eval_functions, ()))
  return _run(config, workdir, stage="ppo", init_items=items, make_iteration=lambda _: step, evaluator=evaluator,
              prompt_iter=PromptIterator(train, batch_size=rc.batch_size, prompt_len=rc.prompt_len,
                                         seed=config.seed, pad_id=pad),
              mesh=mesh, export=lambda it: export_hf(workdir, model_cfg, it["params"]["model"], tok))


class _Jitted:
  """An iteration `f(items, frozen, prompts, mask)` jitted once with explicit shardings and donation (the
  frozen models are arguments, never constants baked into the program); counts its compilations."""

  def __init__(self, f, items, frozen, mesh):
    items_sh = jax.tree.map(lambda x: x.sharding, items)
    frozen_sh = jax.tree.map(lambda x: x.sharding, frozen)
    bs = sharding.batch_sharding(mesh)
    self.mesh, self.frozen = mesh, frozen
    self.fn = jax.jit(f, in_shardings=(items_sh, frozen_sh, bs, bs), out_shardings=(items_sh, None),
                      donate_argnums=(0,))

  def __call__(self, items, toks, mask):
    bs = sharding.batch_sharding(self.mesh)
    t = jax.make_array_from_process_local_data(bs, toks)
    m = jax.make_array_from_process_local_data(bs, mask)
    items, metrics = self.fn(items, self.frozen, t, m)
    return items, fetch(metrics)

  def compiles(self) -> int:
    return self.fn._cache_size()  # noqa: SLF001


def train_grpo(config, workdir: str):
  """GRPO / RLOO / Dr. GRPO / DAPO / GSPO from an SFT run; rewards from reward.init and/or reward.functions."""
  mesh, tok, model_cfg, params, source = prepare(config, workdir)
  train, evals, reports = prompt_examples(config, tok)
  write_reports(workdir, reports)
  g = config.grpo
  frozen, sources = _frozen_models(config, model_cfg, mesh, need_reference=g.kl_coef > 0)
  sources["model"] = source
  functions = load_reward_functions(config.reward.functions, config.reward.weights)
  if not functions and "reward" not in frozen:
    raise ValueError("GRPO needs a reward: set reward.init (a reward model) and/or reward.functions")
  tx, sched = make_optimizer(config.optimizer, params, config.train.steps * g.epochs * g.minibatches)
  st = jax.jit(functools.partial(create, tx=tx, seed=config.seed))(params)
  record_run(workdir, config, model_cfg, sources)
  items = {"params": st.params, "opt_state": st.opt_state, "meta": _make_meta(mesh, 0, 0.0, config.seed)}
  stops, pad = stop_ids(tok), tok.pad_token_id
  rc = config.rollout
  model_w = config.reward.model_weight

  def rollout(items, frozen, toks, mask):
    m = items["meta"]
    state = TrainState(jnp.zeros((), jnp.int32), items["params"], items["opt_state"], m["rng"],
                       jnp.zeros((), jnp.int32), jnp.zeros((), jnp.float32), frozen)
    key = jax.random.fold_in(m["rng"], m["iteration"])
    return grpo_steps.group_rollout(state, toks, mask, key, cfg=model_cfg, rcfg=rc, gcfg=g, stop_ids=stops,
                                    pad_id=pad)

  names = [name for name, _, _ in functions]
  weights = np.asarray([w for _, _, w in functions], np.float32)

  def update(items, frozen, ro, fn_values):
    m = items["meta"]
    rewards = fn_values @ weights  # [B*G, F] values of the reward functions, weighted.
    if "reward" in frozen:
      rewards = rewards + model_w * ro.model_scores
    state = TrainState(jnp.zeros((), jnp.int32), items["params"], items["opt_state"], m["rng"],
                       jnp.zeros((), jnp.int32), jnp.zeros((), jnp.float32), frozen)
    key = jax.random.fold_in(jax.random.fold_in(m["rng"], m["iteration"]), 1)
    state, um = grpo_steps.grpo_update(state, ro, rewards, key, cfg=model_cfg, gcfg=g, temperature=rc.temperature,
                                       tx=tx, schedule=sched)
    if "reward" in frozen:
      um["score"] = ro.model_scores.mean()
    for i, name in enumerate(names):
      um[f"reward/{name}"] = fn_values[:, i].mean()
    new = {"params": state.params, "opt_state": state.opt_state,
           "meta": {"iteration": m["iteration"] + 1, "kl_coef": m["kl_coef"], "rng": m["rng"]}}
    return new, um

  items_sh = jax.tree.map(lambda x: x.sharding, items)
  frozen_sh = jax.tree.map(lambda x: x.sharding, frozen)
  bs = sharding.batch_sharding(mesh)
  j_roll = jax.jit(rollout, in_shardings=(items_sh, frozen_sh, bs, bs), out_shardings=bs)
  j_upd = jax.jit(update, in_shardings=(items_sh, frozen_sh, bs, bs), out_shardings=(items_sh, None),
                  donate_argnums=(0,))

  class Step:
    def __call__(self, items, toks, mask):
      t = jax.make_array_from_process_local_data(bs, toks)
      mk = jax.make_array_from_process_local_data(bs, mask)
      ro = j_roll(items, frozen, t, mk)
      values = np.zeros((len(toks) * g.group_size, len(functions)), np.float32)
      if functions:  # Verifiable rewards: each process decodes and scores its own rows in Python.
        comps = decode_responses(tok, local_rows(ro.tokens)[:, -rc.max_new_tokens:], local_rows(ro.mask))
        prompt_txt = tok.batch_decode(np.repeat(toks, g.group_size, 0), skip_special_tokens=True)
        for i, (name, f, _) in enumerate(functions):
          v = np.asarray(f(prompt_txt, comps), np.float32).reshape(-1)
          if v.shape[0] != len(comps):
            raise ValueError(f"reward function {name} returned {v.shape[0]} values for {len(comps)} completions")
          values[:, i] = v
      items, um = j_upd(items, frozen, ro, jax.make_array_from_process_local_data(bs, values))
      return items, fetch(um)

    def compiles(self):
      return j_roll._cache_size() + j_upd._cache_size()  # noqa: SLF001

  evaluator = Evaluator(config, tok, model_cfg, mesh, evals, frozen,
                        load_reward_functions(config.reward.eval_functions or config.reward.functions, ()))
  return _run(config, workdir, stage="grpo", init_items=items, make_iteration=lambda _: Step(), evaluator=evaluator,
              prompt_iter=PromptIterator(train, batch_size=rc.batch_size, prompt_len=rc.prompt_len,
                                         seed=config.seed, pad_id=pad),
              mesh=mesh, export=lambda it: export_hf(workdir, model_cfg, it["params"]["model"], tok))
