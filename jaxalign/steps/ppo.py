"""PPO for RLHF as two pure functions: `make_experience` (rollout -> scores -> advantages) and `ppo_update`
(epochs x minibatches of clipped policy and value losses, as nested scans).

State: `PPOState(policy, value, kl_coef, iteration)`; the policy's `frozen` holds the reference and the
reward model ({'model', 'head'}); the value model is a decoder with a scalar head.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from jaxalign import sampling, sharding
from jaxalign.losses import rl
from jaxalign.losses.lm import masked_mean, token_entropy, token_logprobs
from jaxalign.models import heads, transformer
from jaxalign.steps.state import TrainState, apply_update


class PPOState(NamedTuple):
  policy: TrainState
  value: TrainState
  kl_coef: jax.Array  # float32, adapted by the KL controller.
  iteration: jax.Array  # int32.


class Rollout(NamedTuple):
  tokens: jax.Array  # [B, P + N]
  positions: jax.Array
  segment_ids: jax.Array
  mask: jax.Array  # [B, N] response tokens.
  old_logp: jax.Array  # [B, N]
  ref_logp: jax.Array
  old_values: jax.Array
  advantages: jax.Array
  returns: jax.Array
  scores: jax.Array  # [B]


def response_logprobs(cfg, params, tokens, positions, segment_ids, prompt_len: int, temperature: float,
                      with_entropy: bool = False, group: int = 1):
  """Log-probs [B, N] (and entropy) of the response tokens under logits / temperature.

  `group` > 1: rows come in groups of that many responses to one prompt (GRPO's layout, rows i * group + j),
  and the prompt is run once per group (`shared_prefix_logits`)."""
  if group > 1:
    logits = shared_prefix_logits(cfg, params, tokens, positions, segment_ids, prompt_len, group)
  else:
    logits, _ = transformer.forward(cfg, params, tokens, positions, segment_ids,
                                    logits_at=slice(prompt_len - 1, tokens.shape[1] - 1))
  logits = logits / temperature
  lp = token_logprobs(logits, tokens[:, prompt_len:])
  return (lp, token_entropy(logits)) if with_entropy else lp


def shared_prefix_logits(cfg, params, tokens, positions, segment_ids, prompt_len: int, group: int):
  """Logits [B, N, V] predicting the response tokens, where each run of `group` rows shares its prompt.

  The prompt goes through the model once per group, into a KV cache; the cache is repeated `group` times and
  the responses attend to it. Exact (the same logits as a full forward of every row); the gradient reaches
  the prompt's keys and values summed over its group. It saves (group - 1) / group of the prompt's compute
  in the reference, old-policy and training passes."""
  bg, t = tokens.shape
  b, p = bg // group, prompt_len
  first = lambda x: x[:, :p].reshape(b, group, p)[:, 0]  # noqa: E731 - the group's prompt (identical rows).
  model = transformer.bind(cfg, params)
  cache = transformer.init_cache(cfg, b, t - 1)
  last, cache = model(first(tokens), first(positions), first(segment_ids), cache, logits_at=slice(-1, None))
  resp, _ = model(tokens[:, p:t - 1], positions[:, p:t - 1], segment_ids[:, p:t - 1],
                  transformer.repeat_cache(cache, group))
  return jnp.concatenate([jnp.repeat(last, group, axis=0), resp], axis=1)


def response_values(cfg, params, tokens, positions, segment_ids, prompt_len: int):
  """V(state before each response token) [B, N]."""
  v = heads.token_values(cfg, params["model"], params["head"], tokens, positions, segment_ids)
  return v[:, prompt_len - 1:-1]


def score_sequences(cfg, reward_params, tokens, positions, segment_ids):
  return heads.sequence_scores(cfg, reward_params["model"], reward_params["head"], tokens, positions, segment_ids)


def make_experience(state: PPOState, prompts, prompt_mask, rng, *, cfg, pcfg, rcfg, stop_ids, pad_id):
  """Rollout and everything the update needs, all on device. `pcfg`: ppo group; `rcfg`: rollout group."""
  p = prompts.shape[1]
  pol = state.policy
  s = sampling.generate(cfg, pol.params["model"], prompts, prompt_mask, rng, max_new_tokens=rcfg.max_new_tokens,
                        temperature=rcfg.temperature, top_k=rcfg.top_k, top_p=rcfg.top_p, stop_ids=stop_ids,
                        pad_id=pad_id)
  tokens, pos, seg = sampling.sequences(prompts, prompt_mask, s)
  mask = s.mask
  old_logp, ent = response_logprobs(cfg, pol.params["model"], tokens, pos, seg, p, rcfg.temperature, True)
  # Each model's pass waits for the previous one (sharding.after: one collective order on every device).
  ref_logp = response_logprobs(cfg, pol.frozen["reference"], *sharding.after((tokens, pos, seg), old_logp), p,
                               rcfg.temperature)
  score = score_sequences(cfg, pol.frozen["reward"], *sharding.after((tokens, pos, seg), ref_logp))
  raw_score = score
  length = mask.sum(-1)
  score = score - pcfg.missing_eos_penalty * (~s.finished).astype(jnp.float32) - pcfg.length_penalty * length
  values = response_values(cfg, state.value.params, *sharding.after((tokens, pos, seg), score), p) * mask
  rewards, kl = rl.token_rewards(score, old_logp, ref_logp, mask, state.kl_coef, pcfg.kl_estimator)
  adv, ret = rl.gae(rewards, values, mask, pcfg.gamma, pcfg.lam)
  if pcfg.whiten_advantages:
    adv = rl.whiten(adv, mask)
  ro = Rollout(tokens, pos, seg, mask, old_logp * mask, ref_logp * mask, values, adv, ret, score)
  kl_seq = kl.sum(-1)
  metrics = {"score": raw_score.mean(), "score_shaped": score.mean(), "kl": kl_seq.mean(),
             "entropy": masked_mean(ent, mask), "response_length": length.mean(),
             "no_eos_fraction": 1.0 - s.finished.astype(jnp.float32).mean(), "kl_coef": state.kl_coef,
             "reward_std": raw_score.std()}
  return ro, metrics


def _policy_loss(pol_params, mb: Rollout, *, cfg, pcfg, temperature, prompt_len):
  lp = response_logprobs(cfg, pol_params["model"], mb.tokens, mb.positions, mb.segment_ids, prompt_len, temperature)
  pl, clipped, approx_kl = rl.ppo_policy_loss(lp, mb.old_logp, mb.advantages, mb.mask, pcfg.clip)
  n = jnp.maximum(mb.mask.sum(), 1.0)
  pol_loss = pl.sum() / n
  return pol_loss, {"policy_loss": pol_loss, "clipfrac": clipped.sum() / n, "approx_kl": approx_kl.sum() / n}


def _value_loss(val_params, mb: Rollout, *, cfg, pcfg, prompt_len):
  v = response_values(cfg, val_params, mb.tokens, mb.positions, mb.segment_ids, prompt_len)
  vl, vclip = rl.ppo_value_loss(v, mb.old_values, mb.returns, mb.mask, pcfg.vf_clip)
  n = jnp.maximum(mb.mask.sum(), 1.0)
  loss = vl.sum() / n
  return loss, {"value_loss": loss, "value_clipfrac": vclip.sum() / n}


def ppo_update(state: PPOState, rollout: Rollout, rng, *, cfg, pcfg, temperature: float, pol_tx, val_tx,
               pol_schedule=None, val_schedule=None):
  """`pcfg.epochs` passes of `pcfg.minibatches` shuffled minibatches; both models updated per minibatch."""
  p = rollout.tokens.shape[1] - rollout.mask.shape[1]
  b = rollout.mask.shape[0]
  m = pcfg.minibatches
  if b % m:
    raise ValueError(f"rollout.batch_size={b} is not divisible by ppo.minibatches={m}")

  def mb_step(carry, mb):
    pol, val = carry
    (_, pm), g = jax.value_and_grad(_policy_loss, has_aux=True)(
        pol.params, mb, cfg=cfg, pcfg=pcfg, temperature=temperature, prompt_len=p)
    pol, pm = apply_update(pol, g, {"loss": pm["policy_loss"], **pm}, pol_tx, pol_schedule)
    mb = sharding.after(mb, pm["grad_norm"])  # The value pass after the policy's (see sharding.after).
    (_, vm), vg = jax.value_and_grad(_value_loss, has_aux=True)(val.params, mb, cfg=cfg, pcfg=pcfg, prompt_len=p)
    val, vm = apply_update(val, vg, {"loss": vm["value_loss"], **vm}, val_tx, val_schedule)
    out = {**{k: v for k, v in pm.items() if k != "loss"}, "value_loss": vm["value_loss"],
           "value_clipfrac": vm["value_clipfrac"], "value_grad_norm": vm["grad_norm"],
           "nonfinite": jnp.maximum(pm["nonfinite"], vm["nonfinite"])}
    return (pol, val), out

  def epoch(carry, key):
    perm = jax.random.permutation(key, b)
    mbs = jax.tree.map(lambda x: x[perm].reshape((m, b // m) + x.shape[1:]), rollout)
    return jax.lax.scan(mb_step, carry, mbs)

  (pol, val), ms = jax.lax.scan(epoch, (state.policy, state.value), jax.random.split(rng, pcfg.epochs))
  metrics = jax.tree.map(lambda x: x.mean() if x.dtype != jnp.int32 else x.max(), ms)
  var_ret = masked_mean((rollout.returns - masked_mean(rollout.returns, rollout.mask)) ** 2, rollout.mask)
  var_res = masked_mean((rollout.returns - rollout.old_values) ** 2, rollout.mask)
  metrics["explained_variance"] = 1.0 - var_res / jnp.maximum(var_ret, 1e-8)
  # Adaptive KL controller (Ziegler et al. 2019): move kl_coef so the sequence KL tracks target_kl.
  kl_now = jnp.sum(rl.kl_estimate(rollout.old_logp, rollout.ref_logp, "k1") * rollout.mask, -1).mean()
  kl_coef = state.kl_coef
  if pcfg.target_kl > 0:
    err = jnp.clip(kl_now / pcfg.target_kl - 1.0, -0.2, 0.2)
    kl_coef = kl_coef * (1.0 + err * b / pcfg.kl_horizon)
  return PPOState(pol, val, kl_coef, state.iteration + 1), metrics
