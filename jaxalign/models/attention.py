"""Attention kernels over segment ids, positions and cache slots.

Letters: B batch, T query length, S key length, N query heads, K kv heads, G = N // K, H head dim.
Masking is by (segment, slot, position): a query attends a key of the same segment whose slot is not later
than its own, and (for sliding layers) whose position is within `window`. Packed rows and ragged KV caches
are therefore exact with one rule.
"""

from __future__ import annotations

import functools

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


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def _fused_attention(q_BTKGH, k_BSKH, v_BSKH, bias_BTS, scale):
  o, _ = _fused_fwd(q_BTKGH, k_BSKH, v_BSKH, bias_BTS, scale)
  return o


def _probs(q_BTKGH, k_BSKH, bias_BTS, scale):
  s = jnp.einsum("btkgh,bskh->bkgts", q_BTKGH, k_BSKH, preferred_element_type=jnp.float32) * scale
  s = s + bias_BTS[:, None, None]
  m = jnp.max(s, axis=-1, keepdims=True)
  e = jnp.exp(s - m)
  return e / jnp.sum(e, axis=-1, keepdims=True)


def _fused_fwd(q_BTKGH, k_BSKH, v_BSKH, bias_BTS, scale):
  p_BKGTS = _probs(q_BTKGH, k_BSKH, bias_BTS, scale)
  o_BTKGH = jnp.einsum("bkgts,bskh->btkgh", p_BKGTS.astype(v_BSKH.dtype), v_BSKH)
  return o_BTKGH, (q_BTKGH, k_BSKH, v_BSKH, bias_BTS, p_BKGTS)


def _fused_bwd(scale, res, do_BTKGH):
  """The attention backward written out (dV = P^T dO; dS = P (dP - rowsum(dO o O)); dQ, dK from dS):
  fewer passes over [B, H, T, S] than autodiff of mask + softmax + einsums."""
  q, k, v, bias, p = res
  dp_BKGTS = jnp.einsum("btkgh,bskh->bkgts", do_BTKGH, v, preferred_element_type=jnp.float32)
  dv = jnp.einsum("bkgts,btkgh->bskh", p.astype(do_BTKGH.dtype), do_BTKGH)
  delta = jnp.sum(dp_BKGTS * p, axis=-1, keepdims=True)
  ds = (p * (dp_BKGTS - delta) * scale).astype(q.dtype)
  dq = jnp.einsum("bkgts,bskh->btkgh", ds, k)
  dk = jnp.einsum("bkgts,btkgh->bskh", ds, q)
  return dq, dk, dv, jnp.zeros_like(bias)


_fused_attention.defvjp(_fused_fwd, _fused_bwd)


def fused_attention(q_BTNH, k_BSKH, v_BSKH, mask_BTS, *, scale: float):
  """Same result as dense_attention (no soft-capping), with a hand-written backward."""
  b, t, n, h = q_BTNH.shape
  kh = k_BSKH.shape[2]
  bias_BTS = jnp.where(mask_BTS, 0.0, _NEG).astype(jnp.float32)
  o = _fused_attention(q_BTNH.reshape(b, t, kh, n // kh, h), k_BSKH, v_BSKH, bias_BTS, scale)
  return o.reshape(b, t, n, h)
