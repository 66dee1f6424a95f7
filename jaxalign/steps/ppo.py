"""PPO for RLHF as pure functions: `make_experience` (rollout -> scores -> advantages), `ppo_update` (epochs x
minibatches of clipped policy and value losses) and `ppo_iteration`, the two composed: the unit the driver
runs, jitted once (purejaxrl's `_update_step`).

State: one `TrainState` with params {'model': policy, 'value': {'model', 'head'}}, opt_state {'policy',
'value'} and extra {'kl_coef'}; `frozen` holds the reference and the reward model ({'model', 'head'}).
Shapes as in `steps.policy`: B rows, P prompt columns, N response columns, S = P + N.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jaxalign import sharding
from jaxalign.models import moe
from jaxalign.losses import rl
from jaxalign.losses.lm import masked_mean
from jaxalign.steps import policy
from jaxalign.steps.policy import Rollout
from jaxalign.steps.state import TrainState, apply_update, create, sub_state


def create_state(policy_params, value_params, policy_tx, value_tx, seed: int, kl_coef: float, frozen) -> TrainState:
  """`policy_params` = {'model': ...}; `value_params` = {'model', 'head'}."""
  opt_state = {"policy": policy_tx.init(policy_params), "value": value_tx.init(value_params)}
  return create({"model": policy_params["model"], "value": value_params}, None, seed, frozen=frozen,
                extra={"kl_coef": jnp.asarray(kl_coef, jnp.float32)}, opt_state=opt_state)


def make_experience(state: TrainState, prompts_BP, prompt_mask_BP, rng, *, cfg, ppo_cfg, rollout_cfg, stop_ids,
                    pad_id) -> tuple[Rollout, dict]:
  """Rollout and everything the update needs, all on device."""
  p = prompts_BP.shape[1]
  pol = state.params["model"]
  s, *seqs = policy.sample(cfg, pol, prompts_BP, prompt_mask_BP, rng, rollout_cfg, stop_ids=stop_ids,
                           pad_id=pad_id)
  mask_BN = s.mask
  old_BN, ent_BN = policy.response_logprobs(cfg, pol, *seqs, p, rollout_cfg.temperature, True)
  ref_BN, raw_B = policy.frozen_passes(cfg, state.frozen, tuple(seqs), old_BN, p, rollout_cfg.temperature)
  length_B = mask_BN.sum(-1)
  score_B = raw_B - ppo_cfg.missing_eos_penalty * (~s.finished).astype(jnp.float32) - \
      ppo_cfg.length_penalty * length_B
  values_BN = policy.response_values(cfg, state.params["value"], *sharding.after(tuple(seqs), score_B), p) * mask_BN
  kl_coef = state.extra["kl_coef"]
  rewards_BN, kl_BN = rl.token_rewards(score_B, old_BN, ref_BN, mask_BN, kl_coef, ppo_cfg.kl_estimator)
  adv_BN, ret_BN = rl.gae(rewards_BN, values_BN, mask_BN, ppo_cfg.gamma, ppo_cfg.lam)
  if ppo_cfg.whiten_advantages:
    adv_BN = rl.whiten(adv_BN, mask_BN)
  ro = Rollout(*seqs, mask_BN, old_BN * mask_BN, ref_BN * mask_BN, score_B, s.finished, values_BN, adv_BN, ret_BN)
  metrics = {"score": raw_B.mean(), "score_shaped": score_B.mean(), "kl": kl_BN.sum(-1).mean(),
             "entropy": masked_mean(ent_BN, mask_BN), "response_length": length_B.mean(),
             "no_eos_fraction": 1.0 - s.finished.astype(jnp.float32).mean(), "kl_coef": kl_coef,
             "reward_std": raw_B.std()}
  return ro, metrics


def _policy_loss(pol_params, mb: Rollout, *, cfg, ppo_cfg, temperature):
  with moe.collect() as router:
    lp_BN = policy.response_logprobs(cfg, pol_params["model"], mb.tokens_BS, mb.positions_BS, mb.segment_ids_BS,
                                     mb.prompt_len, temperature)
  pl_BN, clipped_BN, approx_kl_BN = rl.ppo_policy_loss(lp_BN, mb.old_logp_BN, mb.advantages_BN, mb.mask_BN,
                                                       ppo_cfg.clip)
  n = jnp.maximum(mb.mask_BN.sum(), 1.0)
  loss = pl_BN.sum() / n
  total, extra = moe.add_router_loss(cfg, router, loss, 1.0)
  return total, extra | {"policy_loss": loss, "clipfrac": clipped_BN.sum() / n, "approx_kl": approx_kl_BN.sum() / n}


def _value_loss(val_params, mb: Rollout, *, cfg, ppo_cfg):
  v_BN = policy.response_values(cfg, val_params, mb.tokens_BS, mb.positions_BS, mb.segment_ids_BS, mb.prompt_len)
  vl_BN, vclip_BN = rl.ppo_value_loss(v_BN, mb.values_BN, mb.returns_BN, mb.mask_BN, ppo_cfg.vf_clip)
  n = jnp.maximum(mb.mask_BN.sum(), 1.0)
  loss = vl_BN.sum() / n
  return loss, {"value_loss": loss, "value_clipfrac": vclip_BN.sum() / n}


def ppo_update(state: TrainState, rollout: Rollout, rng, *, cfg, ppo_cfg, temperature: float, policy_tx, value_tx,
               policy_schedule=None, value_schedule=None) -> tuple[TrainState, dict]:
  """`ppo_cfg.epochs` passes of `ppo_cfg.minibatches` shuffled minibatches; both models updated per minibatch;
  then the adaptive KL controller. Returns the state one iteration on."""
  b = rollout.mask_BN.shape[0]
  per_iteration = ppo_cfg.epochs * ppo_cfg.minibatches
  pol0 = sub_state(state, {"model": state.params["model"]}, state.opt_state["policy"], per_iteration)
  val0 = sub_state(state, state.params["value"], state.opt_state["value"], per_iteration)

  def mb_step(carry, mb: Rollout):
    pol, val = carry
    (_, pm), g = jax.value_and_grad(_policy_loss, has_aux=True)(pol.params, mb, cfg=cfg, ppo_cfg=ppo_cfg,
                                                                temperature=temperature)
    pol, pm = apply_update(pol, g, {"loss": pm["policy_loss"], **pm}, policy_tx, policy_schedule)
    mb = sharding.after(mb, pm["grad_norm"])  # The value pass after the policy's (see sharding.after).
    (_, vm), vg = jax.value_and_grad(_value_loss, has_aux=True)(val.params, mb, cfg=cfg, ppo_cfg=ppo_cfg)
    val, vm = apply_update(val, vg, {"loss": vm["value_loss"], **vm}, value_tx, value_schedule)
    out = {**{k: v for k, v in pm.items() if k != "loss"}, "value_loss": vm["value_loss"],
           "value_clipfrac": vm["value_clipfrac"], "value_grad_norm": vm["grad_norm"],
           "nonfinite": jnp.maximum(pm["nonfinite"], vm["nonfinite"])}
    return (pol, val), out

  (pol, val), metrics = policy.minibatch_epochs(mb_step, (pol0, val0), rollout, rng, epochs=ppo_cfg.epochs,
                                                minibatches=ppo_cfg.minibatches, what="rollout.batch_size rows")
  ret_BN, mask_BN = rollout.returns_BN, rollout.mask_BN
  var_ret = masked_mean((ret_BN - masked_mean(ret_BN, mask_BN)) ** 2, mask_BN)
  var_res = masked_mean((ret_BN - rollout.values_BN) ** 2, mask_BN)
  metrics["explained_variance"] = 1.0 - var_res / jnp.maximum(var_ret, 1e-8)
  # Adaptive KL controller (Ziegler et al. 2019): move kl_coef so the sequence KL tracks target_kl.
  kl_now = jnp.sum(rl.kl_estimate(rollout.old_logp_BN, rollout.ref_logp_BN, "k1") * mask_BN, -1).mean()
  kl_coef = state.extra["kl_coef"]
  if ppo_cfg.target_kl > 0:
    err = jnp.clip(kl_now / ppo_cfg.target_kl - 1.0, -0.2, 0.2)
    kl_coef = kl_coef * (1.0 + err * b / ppo_cfg.kl_horizon)
  new = policy.finish_iteration(state, {"model": pol.params["model"], "value": val.params},
                                {"policy": pol.opt_state, "value": val.opt_state}, [pol, val],
                                extra={**state.extra, "kl_coef": kl_coef})
  return new, metrics


def ppo_iteration(state: TrainState, batch: dict, *, cfg, ppo_cfg, rollout_cfg, stop_ids, pad_id, policy_tx,
                  value_tx, policy_schedule=None, value_schedule=None) -> tuple[TrainState, dict]:
  """One PPO iteration, pure: sample responses to `batch` {'prompts', 'prompt_mask'} [B, P], score them,
  compute advantages and update policy and value. Jit it with donation of `state`."""
  k_sample, k_update, _ = jax.random.split(policy.iteration_key(state), 3)
  ro, em = make_experience(state, batch["prompts"], batch["prompt_mask"], k_sample, cfg=cfg, ppo_cfg=ppo_cfg,
                           rollout_cfg=rollout_cfg, stop_ids=stop_ids, pad_id=pad_id)
  state, um = ppo_update(state, ro, k_update, cfg=cfg, ppo_cfg=ppo_cfg, temperature=rollout_cfg.temperature,
                         policy_tx=policy_tx, value_tx=value_tx, policy_schedule=policy_schedule,
                         value_schedule=value_schedule)
  return state, {**em, **um}
