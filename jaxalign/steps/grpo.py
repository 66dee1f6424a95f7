"""Critic-free online RL: GRPO, RLOO, Dr. GRPO, DAPO's clip-higher and token normalisation, GSPO.

G samples per prompt; a sequence reward from the reward model and/or Python reward functions (computed on
the host between `group_rollout` and `grpo_update`); group advantages; a clipped surrogate with an optional
k3 KL to the reference. The policy's `frozen` may hold 'reference' and 'reward' ({'model', 'head'}).
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from jaxalign import sampling, sharding
from jaxalign.losses import rl
from jaxalign.losses.lm import masked_mean
from jaxalign.steps.ppo import response_logprobs, score_sequences
from jaxalign.steps.state import TrainState, apply_update


class GroupRollout(NamedTuple):
  tokens: jax.Array  # [B*G, P + N], groups of G consecutive rows share a prompt.
  positions: jax.Array
  segment_ids: jax.Array
  mask: jax.Array  # [B*G, N]
  old_logp: jax.Array  # [B*G, N]; zeros when on-policy (the update's own forward stands in; see on_policy).
  ref_logp: jax.Array | None  # None without a reference model.
  model_scores: jax.Array  # [B*G] reward-model scores (0 without a reward model).
  finished: jax.Array  # [B*G] bool


def group_rollout(state: TrainState, prompts, prompt_mask, rng, *, cfg, rcfg, gcfg, stop_ids, pad_id):
  """Sample G completions per prompt and compute old/reference log-probs and reward-model scores."""
  g = gcfg.group_size
  s = sampling.generate(cfg, state.params["model"], prompts, prompt_mask, rng, max_new_tokens=rcfg.max_new_tokens,
                        temperature=rcfg.temperature, top_k=rcfg.top_k, top_p=rcfg.top_p, stop_ids=stop_ids,
                        pad_id=pad_id, num_samples=g)  # One prefill per prompt, G samples from its cache.
  prompts, prompt_mask = jnp.repeat(prompts, g, axis=0), jnp.repeat(prompt_mask, g, axis=0)
  p = prompts.shape[1]
  tokens, pos, seg = sampling.sequences(prompts, prompt_mask, s)
  frozen = state.frozen or {}
  if on_policy(gcfg):  # The update's own forward gives these exactly (at the same params); skip a pass.
    old_logp = jnp.zeros_like(s.mask)
  else:
    old_logp = response_logprobs(cfg, state.params["model"], tokens, pos, seg, p, rcfg.temperature, group=g) * s.mask
  # Each model's pass waits for the previous one (sharding.after: one collective order on every device).
  if "reference" in frozen:
    ref_logp = response_logprobs(cfg, frozen["reference"], *sharding.after((tokens, pos, seg), old_logp), p,
                                 rcfg.temperature, group=g) * s.mask
  else:
    ref_logp = None
  scores = score_sequences(cfg, frozen["reward"], *sharding.after((tokens, pos, seg), ref_logp)) if (
      "reward" in frozen) else jnp.zeros(tokens.shape[0], jnp.float32)
  return GroupRollout(tokens, pos, seg, s.mask, old_logp, ref_logp, scores, s.finished)


def on_policy(gcfg) -> bool:
  """One epoch of one minibatch: the update runs at the sampling params, so old log-probs == current ones."""
  return gcfg.epochs == 1 and gcfg.minibatches == 1


def _loss(params, mb, *, cfg, gcfg, temperature, prompt_len, max_len, global_tokens, group):
  lp = response_logprobs(cfg, params["model"], mb["tokens"], mb["positions"], mb["segment_ids"], prompt_len,
                         temperature, group=group)
  mask = mb["mask"]
  if on_policy(gcfg):
    mb = {**mb, "old_logp": jax.lax.stop_gradient(lp)}
  if mb["ref_logp"] is None:  # No reference model (kl_coef 0): a zero KL.
    mb = {**mb, "ref_logp": jax.lax.stop_gradient(lp)}
  adv = mb["advantages"][:, None] * mask
  if gcfg.importance == "sequence":  # GSPO
    lp_eff = mb["old_logp"] + jnp.log(rl.gspo_ratio(lp, mb["old_logp"], mask))
  elif gcfg.importance == "token":
    lp_eff = lp
  else:
    raise ValueError(f"grpo.importance={gcfg.importance!r}: expected token | sequence")
  pl, clipped, approx_kl = rl.ppo_policy_loss(lp_eff, mb["old_logp"], adv, mask, gcfg.clip_low, gcfg.clip_high)
  kl = rl.kl_estimate(lp, mb["ref_logp"], "k3") * mask
  tok_loss = pl + gcfg.kl_coef * kl
  loss = rl.aggregate(tok_loss, mask, gcfg.loss_norm, max_len, global_tokens)
  n = jnp.maximum(mask.sum(), 1.0)
  return loss, {"clipfrac": clipped.sum() / n, "approx_kl": approx_kl.sum() / n, "kl": kl.sum() / n,
                "policy_loss": pl.sum() / n}


def grpo_update(state: TrainState, rollout: GroupRollout, rewards, rng, *, cfg, gcfg, temperature: float, tx,
                schedule=None):
  """Group advantages from `rewards` [B*G], then epochs x minibatches of the clipped surrogate."""
  adv = rl.group_advantages(rewards, gcfg.group_size, gcfg.estimator, gcfg.scale)
  n_rows, max_len = rollout.mask.shape
  p = rollout.tokens.shape[1] - max_len
  m = gcfg.minibatches
  if n_rows % m:
    raise ValueError(f"rollout rows {n_rows} (prompts x group_size) not divisible by grpo.minibatches={m}")
  data = {"tokens": rollout.tokens, "positions": rollout.positions, "segment_ids": rollout.segment_ids,
          "mask": rollout.mask, "old_logp": rollout.old_logp, "ref_logp": rollout.ref_logp, "advantages": adv}
  global_tokens = rollout.mask.sum() / m
  g = gcfg.group_size
  # Minibatches of whole groups (rows stay in group order), so each prompt runs once per group.
  group = g if g > 1 and (n_rows // g) % m == 0 else 1

  def mb_step(st, mb):
    (_, aux), grads = jax.value_and_grad(_loss, has_aux=True)(
        st.params, mb, cfg=cfg, gcfg=gcfg, temperature=temperature, prompt_len=p, max_len=max_len,
        global_tokens=global_tokens, group=group)
    st, met = apply_update(st, grads, {"loss": aux["policy_loss"], **aux}, tx, schedule)
    return st, met

  def epoch(st, key):
    if group > 1:
      perm = (jax.random.permutation(key, n_rows // group)[:, None] * group + jnp.arange(group)).reshape(-1)
    else:
      perm = jax.random.permutation(key, n_rows)
    mbs = jax.tree.map(lambda x: x[perm].reshape((m, n_rows // m) + x.shape[1:]), data)
    return jax.lax.scan(mb_step, st, mbs)

  state, ms = jax.lax.scan(epoch, state, jax.random.split(rng, gcfg.epochs))
  metrics = jax.tree.map(lambda x: x.mean() if x.dtype != jnp.int32 else x.max(), ms)
  metrics.update(reward=rewards.mean(), reward_std=rewards.std(), advantage_abs=jnp.abs(adv).mean(),
                 response_length=rollout.mask.sum(-1).mean(),
                 no_eos_fraction=1.0 - rollout.finished.astype(jnp.float32).mean(),
                 kl_ref=metrics["kl"] if on_policy(gcfg) or rollout.ref_logp is None else
                 masked_mean(rl.kl_estimate(rollout.old_logp, rollout.ref_logp, "k3"), rollout.mask))
  return state, metrics
