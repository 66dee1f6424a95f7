"""Token log-probabilities and masked reductions, all in float32."""

from __future__ import annotations

import jax
import jax.numpy as jnp


def token_logprobs(logits_BTV, targets_BT) -> jax.Array:
  """log p(targets[t] | prefix) per position [B, T]; logsumexp form (no [B, T, V] log-softmax copy)."""
  logits_BTV = logits_BTV.astype(jnp.float32)
  lse_BT = jax.nn.logsumexp(logits_BTV, axis=-1)
  tgt_BT = jnp.take_along_axis(logits_BTV, targets_BT[..., None].astype(jnp.int32), axis=-1)[..., 0]
  return tgt_BT - lse_BT


def token_entropy(logits_BTV) -> jax.Array:
  logp = jax.nn.log_softmax(logits_BTV.astype(jnp.float32), axis=-1)
  return -jnp.sum(jnp.exp(logp) * logp, axis=-1)


def masked_mean(x, mask, axis=None, eps: float = 1e-8):
  return jnp.sum(x * mask, axis=axis) / jnp.maximum(jnp.sum(mask, axis=axis), eps)
