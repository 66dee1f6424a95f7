"""The GRPO stage (and RLOO, Dr. GRPO, DAPO, GSPO): policy and reference from an SFT run, rewards from a
reward model and/or Python functions. The step is `steps.grpo.grpo_iteration`: jitted rollout, the reward
functions on the host (each process scores its own rows), jitted update. `Parts` for the driver."""

from __future__ import annotations

import functools

import jax
import numpy as np

from jaxalign import sharding
from jaxalign.data.prompts import pad_id, stop_ids
from jaxalign.errors import ConfigError
from jaxalign.loops import driver, episodes, setup
from jaxalign.loops.ppo import prompt_data, prompt_spec, rollout_settings
from jaxalign.loops.sampled_eval import SampledEval
from jaxalign.metrics import local_rows
from jaxalign.rewards import functions as reward_functions
from jaxalign.steps import grpo as grpo_steps
from jaxalign.steps import policy


class Iteration:
  """`step(state, batch)` for the driver: `grpo_iteration` over the jitted halves and the host rewards."""

  def __init__(self, rollout, update, functions, tok, mesh, response_len: int, group: int = 1,
               timeout: float | None = None):
    self.rollout, self.update, self.functions, self.timeout = rollout, update, functions, timeout
    self.tok, self.mesh, self.response_len, self.group = tok, mesh, response_len, group
    self.source = None  # The prompt iterator (its `last` examples give the records' prompts and columns).
    self.dynamic = None  # {'max_rollouts': n}: DAPO's dynamic sampling (jit_iteration sets it and its programs).
    self.episodes = None  # Multi-turn episodes (env.name set): `rollout` runs them, rewards gain an 'env' column.
    self.env_rewards, self.env_stats = None, None

  def episode_rollout(self, state, batch):
    """The multi-turn rollout: episodes from the iteration's key (as `group_rollout` draws its samples)."""
    rows = getattr(self.source, "last", None) or []
    ro, self.env_rewards, self.env_stats = self.episodes.run(
        state.params["model"], state.frozen, batch["prompts"], batch["prompt_mask"], rows,
        jax.random.fold_in(policy.iteration_key(state), 3))
    return ro

  def rewards(self, ro) -> jax.Array:
    """[B, F] reward-function values (and the episode's environment reward, last, with env.name) as a global
    array: each process decodes and scores its own rows (one device-to-host copy of its tokens)."""
    f = len(self.functions)
    values = np.zeros((ro.mask_BN.shape[0] // jax.process_count(), f + (self.episodes is not None)), np.float32)
    if self.functions:
      tokens = local_rows(ro.tokens_BS)
      p = tokens.shape[1] - self.response_len
      # The response as the model read it: with episodes, the policy's turns and the observations.
      comps = reward_functions.decode(self.tok, tokens[:, p:], local_rows(ro.segment_ids_BS)[:, p:])
      rows = getattr(self.source, "last", None)
      if rows and len(rows) * self.group == len(comps):  # The records as written, with every column.
        prompts, columns = reward_functions.expand(rows, self.group)
      else:  # Batches not from a prompt iterator (the bench): the prompts decoded from their tokens.
        prompts, columns = self.tok.batch_decode(tokens[:, :p], skip_special_tokens=True), {}
      values[:, :f] = reward_functions.values(self.functions, prompts, comps, columns, timeout=self.timeout)
    if self.episodes is not None:
      values[:, f] = local_rows(self.env_rewards)
    return jax.make_array_from_process_local_data(sharding.batch_sharding(self.mesh), values)

  def __call__(self, state, batch):
    failed = sum(reward_functions.FAILURES.values())
    if self.dynamic is None or self.source is None:
      state, metrics = grpo_steps.grpo_iteration(state, batch, rollout=self.rollout, rewards=self.rewards,
                                                 update=self.update)
    else:
      state, metrics = self._dynamic(state, batch)
    if self.functions:  # Samples whose reward function crashed or timed out (logged where it happened).
      metrics["reward_failures"] = float(sum(reward_functions.FAILURES.values()) - failed)
    if self.env_stats is not None:  # Turns per episode; failed, over-budget and turn-limited episodes.
      metrics.update(self.env_stats._asdict())
    return state, metrics

  def _dynamic(self, state, batch):
    """DAPO's dynamic sampling: groups whose rewards are all equal are dropped and more prompts are sampled
    (at most `max_rollouts` rollouts per iteration) until the batch's groups are all informative; short of
    that, the batch is filled with dropped groups (zero advantage: they add nothing to the gradient). The
    update sees the usual fixed shape (no recompile). Metrics: rollouts drawn and the fraction of groups that
    had to be dropped."""
    want = batch["prompts"].shape[0]
    ros, vals, keep = [], [], []
    for r in range(self.dynamic["max_rollouts"]):
      if r:  # More prompts from the same iterator (its position is checkpointed with the run).
        batch = driver.to_device(next(self.source), self.mesh)
      st = state if r == 0 else state._replace(rng=self.salt(state.rng, r))
      ro = self.rollout(st, batch)
      v = self.rewards(ro)
      ros.append(ro)
      vals.append(v)
      keep.append(np.asarray(jax.device_get(self.informative(ro, v, has_model="reward" in (state.frozen or {})))))
      if sum(int(k.sum()) for k in keep) >= want:
        break
    flags = np.concatenate(keep)
    order = np.concatenate([np.flatnonzero(flags), np.flatnonzero(~flags)])[:want]  # Informative first.
    ro, v = self.take(ros, vals, order)
    state, metrics = self.update(state, ro, v)
    metrics["dynamic_rollouts"] = float(len(ros))
    metrics["dropped_groups"] = float(1.0 - flags.mean())
    return state, metrics

  def compiles(self) -> int:
    roll = self.episodes if self.episodes is not None else self.rollout
    return roll._cache_size() + self.update._cache_size()  # noqa: SLF001


def reward_columns(functions, config) -> tuple[tuple[str, ...], tuple[float, ...]]:
  """Names and weights of the columns of the reward values: the functions', then 'env' with episodes."""
  names, weights = [n for n, _, _ in functions], [w for _, _, w in functions]
  if config.env.name:
    names.append("env")
    weights.append(float(config.env.reward_weight))
  return tuple(names), tuple(weights)


def jit_iteration(state, mesh, model_cfg, config, rollout_cfg, tx, schedule, functions, tok) -> Iteration:
  """GRPO's iteration with its two halves jitted once (explicit shardings; the update donates the state)."""
  state_sh = driver.state_shardings(state, mesh)
  bs, rep = sharding.batch_sharding(mesh), sharding.replicated(mesh)
  g = config.grpo
  pad, stops = pad_id(tok, model_cfg), stop_ids(tok, model_cfg)
  rollout = jax.jit(functools.partial(grpo_steps.group_rollout, cfg=model_cfg, rollout_cfg=rollout_cfg, grpo_cfg=g,
                                      stop_ids=stops, pad_id=pad),
                    in_shardings=(state_sh, bs), out_shardings=bs)
  names, weights = reward_columns(functions, config)
  update = jax.jit(functools.partial(grpo_steps.grpo_update, cfg=model_cfg, grpo_cfg=g,
                                     temperature=rollout_cfg.temperature, tx=tx, schedule=schedule,
                                     fn_names=names, fn_weights=weights, model_weight=config.reward.model_weight),
                   in_shardings=(state_sh, bs, bs), out_shardings=(state_sh, rep), donate_argnums=(0,))
  it = Iteration(rollout, update, functions, tok, mesh, rollout_cfg.max_new_tokens, g.group_size,
                 config.reward.get("timeout_s"))
  if config.env.name:
    it.episodes = episodes.Episodes(model_cfg, rollout_cfg, config.env, tok, mesh, stop_ids=stops, pad_id=pad,
                                    group=g.group_size, policy_logprobs=not grpo_steps.on_policy(g))
    it.rollout = it.episode_rollout
  if g.get("dynamic_sampling", False):
    it.dynamic = {"max_rollouts": max(1, int(g.get("max_rollouts", 3)))}
    it.informative = jax.jit(functools.partial(grpo_steps.informative_groups, group_size=g.group_size,
                                               fn_weights=weights, model_weight=config.reward.model_weight),
                             static_argnames=("has_model",), out_shardings=rep)
    it.take = jax.jit(functools.partial(grpo_steps.take_groups, group_size=g.group_size), out_shardings=(bs, bs))
    it.salt = jax.jit(lambda key, r: jax.random.fold_in(key, 1_000_003 + r), out_shardings=rep)
  return it


def build(config, workdir: str, *, mesh=None, abstract: bool = False) -> driver.Parts:
  g = config.grpo
  ro = rollout_settings(config)
  mesh, tok, model_cfg, params, source = setup.prepare(config, workdir, mesh=mesh, abstract=abstract)
  frozen, sources = setup.load_frozen(config, model_cfg, mesh, reference=g.kl_coef > 0,
                                      reward=bool(config.reward.init), abstract=abstract)
  sources["model"] = source
  functions = reward_functions.load(config.reward.functions, config.reward.weights)
  if not functions and "reward" not in frozen and not config.env.name:
    raise ConfigError("GRPO needs a reward: set reward.init (a reward model), reward.functions and/or env.name")
  tx, sched = setup.optimizer(config, params, config.train.steps * g.epochs * g.minibatches)
  state = setup.new_state(params, tx, config.seed, mesh, frozen=frozen, abstract=abstract)
  step = jit_iteration(state, mesh, model_cfg, config, ro, tx, sched, functions, tok)
  rollout, update = step.rollout, step.update
  parts = driver.Parts("grpo", state, step, None, mesh, baseline_eval=True, compiles=step.compiles)
  if abstract:
    prompts = prompt_spec(config, mesh)
    rows = config.train.batch_size * g.group_size
    values_spec = setup.batch_spec(mesh, {"v": ((rows, len(reward_columns(functions, config)[0])),
                                                 np.float32)})["v"]
    if step.episodes is not None:  # A policy turn over the episode so far, the scoring pass, the update.
      eps, s = step.episodes, ro.prompt_len + ro.max_new_tokens
      b = setup.batch_spec(mesh, {"t": ((rows, s), np.int32), "m": ((rows, s), np.int32),
                                  "r": ((rows, ro.max_new_tokens), np.float32), "f": ((rows,), np.bool_)})
      key = setup.concrete(jax.eval_shape(lambda: jax.random.PRNGKey(0)), mesh)
      turn = (eps._turn, (state.params["model"], b["t"], b["m"], key))  # noqa: SLF001
      score = (eps._score, (state.params["model"], state.frozen, b["t"], b["m"], b["r"], b["f"]))  # noqa: SLF001
      rollout_spec = setup.concrete(jax.eval_shape(*score[:1], *score[1]), mesh)
      parts.programs = {"turn": turn, "score": score, "update": (update, (state, rollout_spec, values_spec))}
      return parts
    rollout_spec = setup.concrete(jax.eval_shape(rollout, state, prompts), mesh)
    parts.programs = {"rollout": (rollout, (state, prompts)), "update": (update, (state, rollout_spec, values_spec))}
    return parts
  parts.batches, evals = prompt_data(config, tok, workdir)
  step.source = parts.batches
  setup.record_run(workdir, config, model_cfg, sources)
  ev = SampledEval(config, tok, model_cfg, mesh, evals, frozen, ro,
                   reward_functions.load(config.reward.eval_functions or config.reward.functions),
                   config.train.batch_size)
  parts.evaluate = ev.evaluate_fn(f"{workdir}/eval_samples.jsonl")
  if config.export.hf:
    parts.export = lambda st: setup.export_hf(workdir, model_cfg, st.params["model"], tok,
                                              dtype=config.export.dtype or None)
  return parts
