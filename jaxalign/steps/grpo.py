"""Critic-free online RL: GRPO, RLOO, Dr. GRPO, DAPO's clip-higher and token normalisation, GSPO.

G samples per prompt; a sequence reward from the reward model and/or Python reward functions; group
advantages; a clipped surrogate with an optional k3 KL to the reference. Two pure, jitted halves,
`group_rollout` and `grpo_update`, with the host's reward functions between them: `grpo_iteration` composes
the three and is what the driver runs. The state's `frozen` may hold 'reference' and 'reward' ({'model',
'head'}). Shapes as in `steps.policy`, with B = prompts x G rows (rows i * G + j answer prompt i) and F reward
functions.
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

from jaxalign.losses import rl
from jaxalign.models import moe
from jaxalign.steps import policy
from jaxalign.steps.policy import Rollout
from jaxalign.steps.state import TrainState, apply_update, sub_state


def group_rollout(state: TrainState, batch: dict, *, cfg, rollout_cfg, grpo_cfg, stop_ids, pad_id) -> Rollout:
  """Sample G completions per prompt of `batch` {'prompts', 'prompt_mask'} [b, P]; old/reference log-probs and
  reward-model scores of the b * G rows."""
  g = grpo_cfg.group_size
  key = policy.iteration_key(state)
  s, *seqs = policy.sample(cfg, state.params["model"], batch["prompts"], batch["prompt_mask"], key, rollout_cfg,
                           stop_ids=stop_ids, pad_id=pad_id, num_samples=g)  # One prefill, G samples.
  p = batch["prompts"].shape[1]
  if on_policy(grpo_cfg):  # The update's own forward gives these exactly (at the same params); skip a pass.
    old_BN = jnp.zeros_like(s.mask)
  else:
    old_BN = policy.response_logprobs(cfg, state.params["model"], *seqs, p, rollout_cfg.temperature,
                                      group=g) * s.mask
  ref_BN, scores_B = policy.frozen_passes(cfg, state.frozen, tuple(seqs), old_BN, p, rollout_cfg.temperature,
                                          group=g)
  if ref_BN is not None:
    ref_BN = ref_BN * s.mask
  return Rollout(*seqs, s.mask, old_BN, ref_BN, scores_B, s.finished)


def on_policy(grpo_cfg) -> bool:
  """One epoch of one minibatch: the update runs at the sampling params, so old log-probs == current ones."""
  return grpo_cfg.epochs == 1 and grpo_cfg.minibatches == 1


def _loss(params, mb: dict, *, cfg, grpo_cfg, temperature, prompt_len, max_len, global_tokens, group):
  with moe.collect() as router:
    lp_BN = policy.response_logprobs(cfg, params["model"], mb["tokens"], mb["positions"], mb["segment_ids"],
                                     prompt_len, temperature, group=group)
  mask_BN = mb["mask"]
  old_BN = jax.lax.stop_gradient(lp_BN) if on_policy(grpo_cfg) else mb["old_logp"]
  ref_BN = jax.lax.stop_gradient(lp_BN) if mb["ref_logp"] is None else mb["ref_logp"]  # None: a zero KL.
  adv_BN = mb["advantages"][:, None] * mask_BN
  if grpo_cfg.importance == "sequence":  # GSPO
    lp_eff_BN = old_BN + jnp.log(rl.gspo_ratio(lp_BN, old_BN, mask_BN))
  elif grpo_cfg.importance == "token":
    lp_eff_BN = lp_BN
  else:
    raise ValueError(f"grpo.importance={grpo_cfg.importance!r}: expected token | sequence")
  pl_BN, clipped_BN, approx_kl_BN = rl.ppo_policy_loss(lp_eff_BN, old_BN, adv_BN, mask_BN, grpo_cfg.clip_low,
                                                       grpo_cfg.clip_high)
  kl_BN = rl.kl_estimate(lp_BN, ref_BN, "k3") * mask_BN
  loss = rl.aggregate(pl_BN + grpo_cfg.kl_coef * kl_BN, mask_BN, grpo_cfg.loss_norm, max_len, global_tokens)
  n = jnp.maximum(mask_BN.sum(), 1.0)
  rows = jnp.maximum(mask_BN.shape[0], 1)
  loss, extra = moe.add_router_loss(cfg, router, loss, 1.0)
  # kl: per response (summed over its tokens, averaged over rows), as PPO and the evals report it.
  return loss, extra | {"clipfrac": clipped_BN.sum() / n, "approx_kl": approx_kl_BN.sum() / n, "kl": kl_BN.sum() / rows,
                "policy_loss": pl_BN.sum() / n}


def total_rewards(rollout: Rollout, fn_values_BF, fn_weights_F, model_weight: float, has_model: bool):
  """The sequence reward [B]: reward functions weighted, plus the reward model's score weighted. A function's
  NaN (its None: not applicable to that row) adds nothing, as TRL's nansum over functions."""
  rewards_B = jnp.nansum(fn_values_BF * jnp.asarray(fn_weights_F, jnp.float32), axis=-1)
  return rewards_B + model_weight * rollout.scores_B if has_model else rewards_B


def informative_groups(rollout: Rollout, fn_values_BF, *, group_size: int, fn_weights=(),
                       model_weight: float = 1.0, has_model: bool = False):
  """[B / G] bool: the groups whose G total rewards are not all equal (DAPO's dynamic sampling keeps only these:
  a group of equal rewards has zero advantages and teaches nothing)."""
  r = total_rewards(rollout, fn_values_BF, np.asarray(fn_weights, np.float32).reshape(-1), model_weight, has_model)
  r = r.reshape(-1, group_size)
  return ~jnp.all(r == r[:, :1], axis=-1)


def take_groups(rollouts: list[Rollout], values: list, groups, group_size: int):
  """The rows of the given groups (indices into the concatenation of `rollouts`), as one Rollout and values."""
  rows = (jnp.asarray(groups)[:, None] * group_size + jnp.arange(group_size)[None, :]).reshape(-1)
  cat = jax.tree.map(lambda *x: jnp.concatenate(x, axis=0), *rollouts)
  return jax.tree.map(lambda x: x[rows], cat), jnp.concatenate(values, axis=0)[rows]


def grpo_update(state: TrainState, rollout: Rollout, fn_values_BF, *, cfg, grpo_cfg, temperature: float, tx,
                schedule=None, fn_names=(), fn_weights=(), model_weight: float = 1.0) -> tuple[TrainState, dict]:
  """Rewards from the reward functions' values [B, F] (and the reward model's scores), group advantages,
  then epochs x minibatches of the clipped surrogate. Returns the state one iteration on."""
  has_model = "reward" in (state.frozen or {})
  rewards_B = total_rewards(rollout, fn_values_BF, np.asarray(fn_weights, np.float32).reshape(-1), model_weight,
                            has_model)
  buffer = int(round(grpo_cfg.get("overlong_fraction", 0.0) * rollout.mask_BN.shape[1]))
  if buffer > 0:  # DAPO's overlong shaping over the last `buffer` tokens of the response budget.
    rewards_B = rewards_B + rl.overlong_penalty(rollout.mask_BN.sum(-1), rollout.mask_BN.shape[1], buffer,
                                                grpo_cfg.get("overlong_penalty", 1.0))
  adv_B = rl.group_advantages(rewards_B, grpo_cfg.group_size, grpo_cfg.estimator, grpo_cfg.scale,
                              eps=grpo_cfg.get("std_eps", 1e-4), ddof=grpo_cfg.get("std_ddof", 1))
  n_rows, max_len = rollout.mask_BN.shape
  m, g = grpo_cfg.minibatches, grpo_cfg.group_size
  data = {"tokens": rollout.tokens_BS, "positions": rollout.positions_BS, "segment_ids": rollout.segment_ids_BS,
          "mask": rollout.mask_BN, "old_logp": rollout.old_logp_BN, "ref_logp": rollout.ref_logp_BN,
          "advantages": adv_B}
  global_tokens = rollout.mask_BN.sum() / m
  # Minibatches of whole groups (rows stay in group order), so each prompt runs once per group.
  group = g if g > 1 and (n_rows // g) % m == 0 else 1
  inner = sub_state(state, state.params, state.opt_state, grpo_cfg.epochs * m, state.frozen)

  def mb_step(st, mb):
    (_, aux), grads = jax.value_and_grad(_loss, has_aux=True)(
        st.params, mb, cfg=cfg, grpo_cfg=grpo_cfg, temperature=temperature, prompt_len=rollout.prompt_len,
        max_len=max_len, global_tokens=global_tokens, group=group)
    return apply_update(st, grads, {"loss": aux["policy_loss"], **aux}, tx, schedule)

  k_update = jax.random.fold_in(policy.iteration_key(state), 1)
  inner, metrics = policy.minibatch_epochs(mb_step, inner, data, k_update, epochs=grpo_cfg.epochs, minibatches=m,
                                           group=group, what="rollout rows (prompts x group_size)")
  mask_BN = rollout.mask_BN
  groups_GK = rewards_B.reshape(-1, grpo_cfg.group_size)
  metrics.update(reward=rewards_B.mean(), reward_std=rewards_B.std(), advantage_abs=jnp.abs(adv_B).mean(),
                 # Groups whose samples all got the same reward: no learning signal (DAPO's dynamic sampling).
                 zero_variance_groups=jnp.mean(jnp.all(groups_GK == groups_GK[:, :1], axis=-1)),
                 response_length=mask_BN.sum(-1).mean(), response_length_max=mask_BN.sum(-1).max(),
                 no_eos_fraction=1.0 - rollout.finished_B.astype(jnp.float32).mean(),
                 kl_ref=metrics["kl"] if on_policy(grpo_cfg) or rollout.ref_logp_BN is None else
                 jnp.sum(rl.kl_estimate(rollout.old_logp_BN, rollout.ref_logp_BN, "k3") * mask_BN, -1).mean())
  if has_model:
    metrics["score"] = rollout.scores_B.mean()
  for i, name in enumerate(fn_names):
    metrics[f"reward/{name}"] = jnp.nanmean(fn_values_BF[:, i])  # Rows where it applies.
  return policy.finish_iteration(state, inner.params, inner.opt_state, [inner]), metrics


def grpo_iteration(state: TrainState, batch: dict, *, rollout: Callable, rewards: Callable, update: Callable):
  """One GRPO iteration: `rollout(state, batch)` (jitted `group_rollout`), `rewards(rollout) -> [B, F]` on the
  host (each process scores its own rows; a global array comes back), `update(state, rollout, values)`
  (jitted `grpo_update`, state donated)."""
  ro = rollout(state, batch)
  return update(state, ro, rewards(ro))
