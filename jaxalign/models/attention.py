"""Attention kernels over segment ids, positions and cache slots.

Letters: B batch, T query length, S key length, N query heads, K kv heads, G = N // K, H head dim.
Masking is by (segment, slot, position): a query attends a key of the same segment whose slot is not later
than its own, and (for sliding layers) whose position is within `window`. Packed rows and ragged KV caches
are therefore exact with one rule.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

_NEG = -1e30


def make_mask(q_seg_BT, q_slot_T, q_pos_BT, k_seg_BS, k_slot_S, k_pos_BS, window) -> jax.Array:
  """Boolean [B, T, S] mask; `window` (traced int, 0 = full) bounds q_pos - k_pos."""
  same_seg = q_seg_BT[:, :, None] == k_seg_BS[:, None, :]
  causal = (k_slot_S[None, :] <= q_slot_T[:, None])[None]
  dist = q_pos_BT[:, :, None] - k_pos_BS[:, None, :]
  in_window = jnp.where(window > 0, dist < window, True)
  return same_seg & causal & in_window


def dense_attention(q_BTNH, k_BSKH, v_BSKH, mask_BTS, *, scale: float, softcap: float | None):
  """Reference attention; scores, softmax in float32."""
  b, t, n, h = q_BTNH.shape
  k = k_BSKH.shape[2]
  q_BTKGH = q_BTNH.reshape(b, t, k, n // k, h)
  s_BKGTS = jnp.einsum("btkgh,bskh->bkgts", q_BTKGH, k_BSKH, preferred_element_type=jnp.float32) * scale
  if softcap:
    s_BKGTS = jnp.tanh(s_BKGTS / softcap) * softcap
  s_BKGTS = jnp.where(mask_BTS[:, None, None], s_BKGTS, _NEG)
  p_BKGTS = jax.nn.softmax(s_BKGTS, axis=-1).astype(v_BSKH.dtype)
  o_BTKGH = jnp.einsum("bkgts,bskh->btkgh", p_BKGTS, v_BSKH)
  return o_BTKGH.reshape(b, t, n, h)
