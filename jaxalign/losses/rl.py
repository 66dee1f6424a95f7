"""Online-RL pieces as pure functions over [B, N] response-token arrays (N = max new tokens).

`mask` marks real response tokens (through EOS); everything is float32.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jaxalign.losses.lm import masked_mean


def kl_estimate(logp, ref_logp, kind: str = "k1"):
  """Per-token KL(pi || ref) estimators (Schulman 2020): k1 = log r, k2 = (log r)^2 / 2, k3 = r' - 1 - log r'
  with log r = logp - ref_logp and r' = 1 / r (non-negative, unbiased; GRPO's choice)."""
  d = logp - ref_logp
  if kind == "k1":
    return d
  if kind == "k2":
    return 0.5 * d * d
  if kind == "k3":
    return jnp.exp(-d) - 1.0 + d
  raise ValueError(f"kl estimator {kind!r}: expected k1 | k2 | k3")


def last_token_index(mask):
  """Index of the last real token of each row [B] (0 for an empty row)."""
  n = mask.shape[-1]
  return jnp.max(jnp.where(mask > 0, jnp.arange(n), 0), axis=-1)


def token_rewards(score, logp, ref_logp, mask, kl_coef, kl_kind: str = "k1"):
  """r_t = -kl_coef * KL_t on every response token, plus the sequence score on its last token
  (Ziegler et al. 2019; Stiennon et al. 2020). Returns (rewards [B, N], per-token KL [B, N])."""
  kl = kl_estimate(logp, ref_logp, kl_kind) * mask
  r = -kl_coef * kl
  last = last_token_index(mask)
  r = r + jax.nn.one_hot(last, mask.shape[-1], dtype=r.dtype) * score[:, None]
  return r * mask, kl


def gae(rewards, values, mask, gamma: float, lam: float):
  """Generalised advantage estimation (Schulman et al. 2016) as a reverse scan over time.

  The value after the last real token is 0 (episode ends), and padding positions carry nothing.
  Returns (advantages, returns), both [B, N].
  """
  next_values = jnp.concatenate([values[:, 1:], jnp.zeros_like(values[:, :1])], axis=1) * jnp.concatenate(
      [mask[:, 1:], jnp.zeros_like(mask[:, :1])], axis=1)

  def step(carry, xs):
    r, v, nv, m = xs
    delta = r + gamma * nv - v
    adv = delta + gamma * lam * carry
    adv = adv * m
    return adv, adv

  xs = tuple(jnp.swapaxes(a, 0, 1) for a in (rewards, values, next_values, mask))
  _, adv_T = jax.lax.scan(step, jnp.zeros(rewards.shape[0], rewards.dtype), xs, reverse=True)
  adv = jnp.swapaxes(adv_T, 0, 1)
  return adv, (adv + values) * mask


def whiten(x, mask, shift_mean: bool = True, eps: float = 1e-8):
  mean = masked_mean(x, mask)
  var = masked_mean((x - mean) ** 2, mask)
  out = (x - mean) * jax.lax.rsqrt(var + eps)
  if not shift_mean:
    out = out + mean
  return out * mask


def ppo_policy_loss(logp, old_logp, advantages, mask, clip_low: float, clip_high: float | None = None):
  """Clipped surrogate (Schulman et al. 2017), per token; clip_high > clip_low is DAPO's clip-higher.
  Returns (per-token loss, clipped indicator, approx KL (k3 of old vs new))."""
  clip_high = clip_low if clip_high is None else clip_high
  ratio = jnp.exp(logp - old_logp)
  unclipped = -advantages * ratio
  clipped = -advantages * jnp.clip(ratio, 1.0 - clip_low, 1.0 + clip_high)
  loss = jnp.maximum(unclipped, clipped)
  return loss * mask, (clipped > unclipped).astype(jnp.float32) * mask, kl_estimate(old_logp, logp, "k3") * mask


def ppo_value_loss(values, old_values, returns, mask, clip: float):
  """Clipped value loss 0.5 * max((v - R)^2, (v_clip - R)^2). Returns (per-token loss, clipped indicator)."""
  v_clip = old_values + jnp.clip(values - old_values, -clip, clip)
  a, b = (values - returns) ** 2, (v_clip - returns) ** 2
  return 0.5 * jnp.maximum(a, b) * mask, (b > a).astype(jnp.float32) * mask


def gspo_ratio(logp, old_logp, mask):
  """GSPO (Zheng et al. 2025): one importance ratio per sequence, exp(mean_t(logp - old_logp)),
  broadcast over tokens (with the token-level gradient path of the paper's GSPO-token form)."""
  n = jnp.maximum(mask.sum(-1, keepdims=True), 1.0)
  seq = jnp.sum((logp - old_logp) * mask, -1, keepdims=True) / n
  return jnp.exp(jax.lax.stop_gradient(seq) + logp - jax.lax.stop_gradient(logp))


def group_advantages(rewards, group_size: int, estimator: str = "grpo", scale: str = "group", eps: float = 1e-4,
                     ddof: int = 1):
  """Sequence advantages from G samples per prompt (rows grouped consecutively).

  grpo: r - mean(group) (Shao et al. 2024); rloo: r - mean(others) (Ahmadian et al. 2024).
  scale: divide by the group std ('group', GRPO), the batch std ('batch'), or not ('none', Dr. GRPO).
  The std is TRL's GRPOTrainer's by default: the sample std (ddof=1, torch's default) plus eps 1e-4;
  `ddof=0, eps=1e-6` gives the population form (`grpo.std_ddof`, `grpo.std_eps`). With one sample the
  population std is used (a sample std of one value is undefined).
  """
  r = rewards.reshape(-1, group_size)
  mean = r.mean(-1, keepdims=True)
  if estimator == "grpo":
    adv = r - mean
  elif estimator == "rloo":
    if group_size < 2:
      raise ValueError("rloo needs rollout.group_size >= 2")
    adv = (r - mean) * group_size / (group_size - 1)
  else:
    raise ValueError(f"grpo.estimator={estimator!r}: expected grpo | rloo")
  if scale == "group":
    adv = adv / (r.std(-1, keepdims=True, ddof=ddof if group_size > 1 else 0) + eps)
  elif scale == "batch":
    adv = adv / (rewards.std(ddof=ddof if rewards.size > 1 else 0) + eps)
  elif scale != "none":
    raise ValueError(f"grpo.scale={scale!r}: expected group | batch | none")
  return adv.reshape(-1)


def overlong_penalty(lengths_B, max_len: int, buffer: int, factor: float = 1.0):
  """DAPO's soft overlong punishment (Yu et al. 2025, eq. 13): 0 up to max_len - buffer tokens, then falling
  linearly to -factor at the budget (and beyond): ((max_len - buffer) - L) / buffer in between."""
  start = max_len - buffer
  return -factor * jnp.clip((lengths_B.astype(jnp.float32) - start) / buffer, 0.0, 1.0)


def aggregate(loss_tok, mask, mode: str, max_len: int, global_tokens=None):
  """Reduce per-token losses [B, N] to a scalar by the normalisation in use.

  sequence: mean over rows of each row's token mean (GRPO); token: mean over the minibatch's tokens;
  constant: sum / (rows * max_len) (Dr. GRPO); global_token: sum / tokens of the whole rollout batch (DAPO).
  """
  if mode == "sequence":
    per_row = loss_tok.sum(-1) / jnp.maximum(mask.sum(-1), 1.0)
    return per_row.mean()
  if mode == "token":
    return loss_tok.sum() / jnp.maximum(mask.sum(), 1.0)
  if mode == "constant":
    return loss_tok.sum() / (mask.shape[0] * max_len)
  if mode == "global_token":
    return loss_tok.sum() / jnp.maximum(global_tokens, 1.0)
  raise ValueError(f"loss normalisation {mode!r}: expected sequence | token | constant | global_token")
