"""Rotary position embeddings as transformers computes them: default, linear, llama3, YaRN and dynamic NTK,
partial rotary dims (Phi-4-mini), and a second set for sliding-window layers (Gemma 3's local base).

A model has one or two rope *sets* ('global' for full-attention layers, and with `cfg.rope_local` 'local' for
sliding-window layers); `tables` returns the sin/cos of each set stacked on a leading axis and `set_index`
says which set each layer reads, so a scanned layer picks its tables with one dynamic index.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

TYPES = ("default", "linear", "llama3", "yarn", "dynamic")


def rotary_dim(cfg) -> int:
  """Head dims that rotate (the first ones); the rest pass through (`partial_rotary_factor`)."""
  return int(cfg.head_dim * cfg.partial_rotary_factor)


def params_sets(cfg) -> list[dict]:
  """The rope parameter dicts (with 'rope_theta' and 'rope_type'): [global] or [global, local]."""
  glob = {"rope_theta": cfg.rope_theta, "rope_type": "default", **dict(cfg.rope_scaling or ())}
  sets = [glob]
  if cfg.rope_local is not None:
    sets.append({"rope_type": "default", **dict(cfg.rope_local)})
  return sets


def set_index(cfg) -> list[int]:
  """Per layer, the rope set it reads: 1 (local) for sliding-window layers when the model has a local set."""
  if cfg.rope_local is None:
    return [0] * cfg.num_layers
  return [1 if w else 0 for w in cfg.window_sizes()]


def check(params: dict, where: str = "rope"):
  """Reject at load time what the forward could not compute (so a config does not fail mid-run)."""
  kind = params.get("rope_type", params.get("type", "default"))
  if kind not in TYPES:
    raise NotImplementedError(f"{where}: rope_type={kind!r} is not supported (supported: {', '.join(TYPES)}; "
                              "LongRoPE (Phi-3 128k, Phi-4-mini) is not built)")
  need = {"linear": ("factor",), "llama3": ("factor", "low_freq_factor", "high_freq_factor",
                                           "original_max_position_embeddings"),
          "yarn": ("original_max_position_embeddings",), "dynamic": ("factor",)}.get(kind, ())
  missing = [k for k in need if params.get(k) is None]
  if missing:
    raise ValueError(f"{where}: rope_type={kind!r} needs {missing}")


def inv_frequencies(params: dict, dim: int, max_positions: int) -> tuple[np.ndarray, float]:
  """(inverse frequencies [dim // 2] float32, attention factor) of one static rope set ('dynamic' returns its
  unscaled base frequencies: `tables` rescales them from the batch's positions)."""
  base = float(params["rope_theta"])
  kind = params.get("rope_type", params.get("type", "default"))
  inv = 1.0 / (base ** (np.arange(0, dim, 2, dtype=np.float64) / dim))
  if kind in ("default", "dynamic"):
    return inv.astype(np.float32), 1.0
  if kind == "linear":
    return (inv / params["factor"]).astype(np.float32), 1.0
  if kind == "llama3":
    factor, lo, hi = params["factor"], params["low_freq_factor"], params["high_freq_factor"]
    old = params["original_max_position_embeddings"]
    wavelen = 2 * np.pi / inv
    scaled = np.where(wavelen > old / lo, inv / factor, inv)
    smooth = (old / wavelen - lo) / (hi - lo)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = ~(wavelen < old / hi) & ~(wavelen > old / lo)
    return np.where(medium, smoothed, scaled).astype(np.float32), 1.0
  if kind == "yarn":
    return _yarn(params, base, dim, max_positions)
  raise NotImplementedError(f"rope_type={kind!r} is not supported")


def _yarn(params: dict, base: float, dim: int, max_positions: int) -> tuple[np.ndarray, float]:
  """YaRN (arXiv 2309.00071) as transformers' `_compute_yarn_parameters`: interpolate the low frequencies by
  `factor`, keep the high ones, ramp between the dims where [beta_slow, beta_fast] rotations fit the original
  context (floored/ceiled unless `truncate` is false); cos/sin are scaled by the attention factor."""
  old = params["original_max_position_embeddings"]
  factor = params.get("factor") or max_positions / old
  mscale, mscale_all = params.get("mscale"), params.get("mscale_all_dim")

  def get_mscale(scale, m=1.0):
    return 1.0 if scale <= 1 else 0.1 * m * math.log(scale) + 1.0

  attn = params.get("attention_factor")
  if attn is None:
    attn = get_mscale(factor, mscale) / get_mscale(factor, mscale_all) if mscale and mscale_all else get_mscale(factor)
  beta_fast, beta_slow = params.get("beta_fast") or 32, params.get("beta_slow") or 1

  def corr(rot):
    return dim * math.log(old / (rot * 2 * math.pi)) / (2 * math.log(base))

  low, high = corr(beta_fast), corr(beta_slow)
  if params.get("truncate", True):
    low, high = math.floor(low), math.ceil(high)
  low, high = max(low, 0), min(high, dim - 1)
  if low == high:
    high += 0.001
  # float32 like transformers (its ramp and frequencies are torch float32).
  ramp = np.clip((np.arange(dim // 2, dtype=np.float32) - np.float32(low)) / np.float32(high - low), 0, 1)
  pos_freqs = np.float32(base) ** (np.arange(0, dim, 2, dtype=np.float32) / np.float32(dim))
  extra = (1.0 - ramp).astype(np.float32)
  inv = (1.0 / (factor * pos_freqs)) * (1 - extra) + (1.0 / pos_freqs) * extra
  return inv.astype(np.float32), float(attn)


def tables(cfg, positions_BT):
  """sin, cos [R, B, T, rotary_dim] for the model's R rope sets, computed once per forward.

  Why the identity matmul: XLA fuses an elementwise producer into each of its consumers, so plain
  `jnp.sin` tables were recomputed inside every q/k rotation, forward and backward, of every layer (40 sine
  and 40 cosine ops in the bench's SFT step). A dot's output is a buffer that its consumers read: the tables
  are computed once (SFT step 0.959x the time, paired A/B). Exact: products with 1 and 0 at HIGHEST
  precision (no TF32/bf16 passes on accelerators), and the dot costs 2 x (2H)^2 FLOPs per token."""
  dim = rotary_dim(cfg)
  pos_BT = positions_BT.astype(jnp.float32)
  sins, coss = [], []
  for params in params_sets(cfg):
    inv_np, attn = inv_frequencies(params, dim, cfg.max_position_embeddings)
    inv_H2 = jnp.asarray(inv_np)
    if params.get("rope_type") == "dynamic":
      inv_H2 = _dynamic(params, positions_BT, dim, cfg.max_position_embeddings)
    ang_BTH2 = pos_BT[..., None] * inv_H2
    ang_BTH = jnp.concatenate([ang_BTH2, ang_BTH2], axis=-1)
    sin, cos = jnp.sin(ang_BTH), jnp.cos(ang_BTH)
    if attn != 1.0:
      sin, cos = sin * attn, cos * attn
    sins.append(sin)
    coss.append(cos)
  sc_BTX = jnp.concatenate(sins + coss, axis=-1)
  sc_BTX = jnp.einsum("btx,xy->bty", sc_BTX, jnp.eye(sc_BTX.shape[-1], dtype=jnp.float32),
                      precision=jax.lax.Precision.HIGHEST)
  r = len(sins)
  parts = jnp.split(sc_BTX, 2 * r, axis=-1)
  return jnp.stack(parts[:r]), jnp.stack(parts[r:])


def _dynamic(params: dict, positions_BT, dim: int, max_positions: int):
  """Dynamic NTK: the base grows with the longest position in the batch beyond `max_position_embeddings`
  (transformers' `dynamic_rope_update`: seq_len = max(position_ids) + 1), unchanged within it."""
  factor, base = float(params["factor"]), float(params["rope_theta"])
  seq = jnp.maximum(jnp.max(positions_BT).astype(jnp.float32) + 1.0, float(max_positions))
  new_base = base * ((factor * seq / max_positions) - (factor - 1)) ** (dim / (dim - 2))
  return 1.0 / (new_base ** (jnp.arange(0, dim, 2, dtype=jnp.float32) / dim))


def apply(x_BTNH, sin_BTH, cos_BTH):
  """Rotate-half RoPE of the first rotary dims, in the dtype of x, as transformers does it.

  The angles and their sin/cos are float32 (`tables`); the rotation itself runs in the activation dtype,
  with the tables cast to it: transformers' `apply_rotary_pos_emb` casts cos/sin to q's dtype, so bf16 logits
  match it this way. It is also the cheaper program: a float32 rotation doubles the q/k bytes each layer moves
  (TPU cost model, Llama-3-8B SFT 4k on v5p-128: 0.693 -> 0.678 s per step, docs/performance.md)."""
  cos, sin = cos_BTH.astype(x_BTNH.dtype), sin_BTH.astype(x_BTNH.dtype)
  rot_dim = cos.shape[-1]
  h = x_BTNH.shape[-1]
  # Splits, not slices: a split's gradient is one concatenate, a slice's a zero-padded full-width array.
  x_rot, x_pass = (x_BTNH, None) if rot_dim == h else jax.lax.split(x_BTNH, [rot_dim, h - rot_dim], axis=-1)
  half = rot_dim // 2
  x1, x2 = jax.lax.split(x_rot, [half, rot_dim - half], axis=-1)
  rot = jnp.concatenate([-x2, x1], axis=-1)
  out = x_rot * cos[:, :, None, :] + rot * sin[:, :, None, :]
  return out if x_pass is None else jnp.concatenate([out, x_pass], axis=-1)
