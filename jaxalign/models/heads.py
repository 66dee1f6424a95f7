"""Scalar head for reward and value models: a linear map of the final hidden state to one number per token."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jaxalign.models import transformer
from jaxalign.models.config import ModelConfig

HEAD_AXES = {"w": ("embed",)}


def init_head(cfg: ModelConfig, rng: jax.Array) -> dict:
  """Small random init (as HF's score layer), so rewards start near 0 without a dead gradient."""
  w = jax.random.normal(rng, (cfg.hidden_size,), jnp.float32) * (1.0 / cfg.hidden_size)
  return {"w": w.astype(jnp.dtype(cfg.param_dtype))}


def head_shapes(cfg: ModelConfig) -> dict:
  return {"w": jax.ShapeDtypeStruct((cfg.hidden_size,), jnp.dtype(cfg.param_dtype))}


def token_values(cfg: ModelConfig, params: dict, head: dict, tokens_BT, positions_BT=None, segment_ids_BT=None):
  """Scalar per token [B, T] in float32 (the value model uses all of them)."""
  h_BTD, _ = transformer.hidden_states(cfg, params, tokens_BT, positions_BT, segment_ids_BT)
  return jnp.einsum("btd,d->bt", h_BTD.astype(jnp.float32), head["w"].astype(jnp.float32))


def last_index(segment_ids_BT) -> jax.Array:
  """Index of the last non-padding token of each row (right padding)."""
  t = segment_ids_BT.shape[1]
  idx = jnp.arange(t)[None, :]
  return jnp.max(jnp.where(segment_ids_BT > 0, idx, 0), axis=1)


def sequence_scores(cfg: ModelConfig, params: dict, head: dict, tokens_BT, positions_BT=None, segment_ids_BT=None):
  """Reward of each row, read at its last real token [B] (as HF's *ForSequenceClassification)."""
  if segment_ids_BT is None:
    segment_ids_BT = jnp.ones_like(tokens_BT)
  v_BT = token_values(cfg, params, head, tokens_BT, positions_BT, segment_ids_BT)
  return jnp.take_along_axis(v_BT, last_index(segment_ids_BT)[:, None], axis=1)[:, 0]
