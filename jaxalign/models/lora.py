"""Low-rank adapters (Hu et al. 2021) on chosen projections of the stacked layers.

W x becomes W x + (alpha / r) B (A x), with A random and B zero at init (so the adapted model starts as the
base). With adapters switched off (`use_lora=False`) the same params give the base model: that is the DPO /
PPO reference, so no second copy of the weights is held. `merge` folds the adapters into W for export.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jaxalign.models.config import LORA_SHAPES, ModelConfig

_AXES = {"d": ("embed",), "nh": ("heads", "head_dim"), "kh": ("kv_heads", "head_dim"), "f": ("mlp",)}


def _dims(cfg: ModelConfig, code: str) -> tuple[int, ...]:
  return {"d": (cfg.hidden_size,), "nh": (cfg.num_heads, cfg.head_dim), "kh": (cfg.num_kv_heads, cfg.head_dim),
          "f": (cfg.intermediate_size,)}[code]


def adapter_specs(cfg: ModelConfig):
  """name -> (shape, logical axes, init) for every adapter leaf of the layer stack."""
  out = {}
  l, r = cfg.num_layers, cfg.lora_rank
  for t in cfg.lora_targets:
    a, b = LORA_SHAPES[t]
    out[f"lora_a_{t}"] = ((l, *_dims(cfg, a), r), ("layers", *_AXES[a], "lora_rank"), "lora_a")
    out[f"lora_b_{t}"] = ((l, r, *_dims(cfg, b)), ("layers", "lora_rank", *_AXES[b]), "zeros")
  return out


def delta(cfg: ModelConfig, p: dict, name: str, x):
  """The adapter's contribution for projection `name` on input x (shapes as the base einsum's output)."""
  a, b = p[f"lora_a_{name}"].astype(x.dtype), p[f"lora_b_{name}"].astype(x.dtype)
  scale = cfg.lora_alpha / cfg.lora_rank
  h_BTR = jnp.einsum("btnh,nhr->btr", x, a) if a.ndim == 3 else x @ a
  if b.ndim == 3:
    return scale * jnp.einsum("btr,rnh->btnh", h_BTR, b)
  return scale * (h_BTR @ b)


def is_adapter(path: str) -> bool:
  return "lora_" in path


def merge(cfg: ModelConfig, params: dict) -> dict:
  """Params with the adapters folded into the base weights and removed (for HF export)."""
  layers = dict(params["layers"])
  scale = cfg.lora_alpha / cfg.lora_rank
  for t in cfg.lora_targets:
    a, b = layers.pop(f"lora_a_{t}"), layers.pop(f"lora_b_{t}")
    a2 = a.reshape(a.shape[0], -1, a.shape[-1])
    b2 = b.reshape(b.shape[0], b.shape[1], -1)
    w = layers[t]
    layers[t] = (w + scale * jnp.einsum("lir,lro->lio", a2, b2).reshape(w.shape)).astype(w.dtype)
  return {**params, "layers": layers}


def strip(cfg: ModelConfig, params: dict) -> dict:
  """The base params alone (adapters dropped, not merged)."""
  return {**params, "layers": {k: v for k, v in params["layers"].items() if not is_adapter(k)}}


def count(params) -> tuple[int, int]:
  """(adapter parameters, all parameters)."""
  flat = jax.tree_util.tree_flatten_with_path(params)[0]
  total = sum(x.size for _, x in flat)
  lora = sum(x.size for p, x in flat if is_adapter(jax.tree_util.keystr(p)))
  return lora, total
