"""Hugging Face checkpoint directory <-> jaxalign params.

Loading reads memory-mapped safetensors (single file or sharded with an index) in pieces of at most one
per-layer tensor, each placed directly with its target sharding and written into the final sharded array on
device: every host reads only the slices its devices hold, and holds at most one piece at a time. Saving
writes safetensors + config.json that `transformers` loads.

The directory may be in a bucket (gs://): safetensors are then read in place by ranged reads through the path
layer (one layer tensor's bytes, or an embedding's rows, at a time; nothing downloaded whole), and only the small
files transformers itself must parse (config.json, tokenizer files) are copied to a local cache
(`paths.local_copy`). Saving writes
safetensors straight to the bucket and uploads what `save_pretrained` wrote locally.
"""

from __future__ import annotations

import functools
import json
import math
import os
import struct
from typing import Any, Callable, Iterator

import jax
import ml_dtypes
import numpy as np

from jaxalign import paths
from jaxalign.models.config import FAMILIES, ModelConfig
from jaxalign.metrics import to_host

_ST_DTYPES = {"F32": np.float32, "F16": np.float16, "BF16": ml_dtypes.bfloat16, "F64": np.float64,
              "I64": np.int64, "I32": np.int32, "I8": np.int8, "U8": np.uint8, "BOOL": np.bool_}
_ST_NAMES = {np.dtype(v): k for k, v in _ST_DTYPES.items()}
# transformers' ACT2FN names -> ours. "gelu" is the exact (erf) GELU everywhere it is read; Gemma 1's config
# itself rewrites its legacy hidden_act="gelu" to the tanh form before we see it, as transformers runs it.
_ACTS = {"silu": "silu", "swish": "silu", "gelu_pytorch_tanh": "gelu_tanh", "gelu_tanh": "gelu_tanh",
         "gelu_new": "gelu_tanh", "gelu": "gelu"}


# ----------------------------------------------------------------------------------------------- config mapping

def config_from_hf(path_or_config, **overrides) -> ModelConfig:
  """ModelConfig from an HF checkpoint directory (or a transformers config object)."""
  import transformers  # Heavy import, only where needed.

  c = path_or_config
  if isinstance(c, (str, os.PathLike)):
    if not paths.exists(paths.join(str(c), "config.json")):
      raise FileNotFoundError(f"{c}: no config.json; model.init must be a Hugging Face checkpoint directory "
                              "or a jaxalign run directory")
    c = transformers.AutoConfig.from_pretrained(paths.local_copy(str(c), skip_weights=True))
  mt = c.model_type
  if mt == "gemma3":
    raise ValueError("model_type 'gemma3' is Gemma 3's image-text model; jaxalign trains its text model: load the "
                     "checkpoint's language model as Gemma3ForCausalLM (model_type 'gemma3_text') and save that")
  if mt not in FAMILIES:
    raise ValueError(f"model_type {mt!r} is not supported; supported families: {FAMILIES}")
  if getattr(c, "mlp_bias", False) or (mt not in ("qwen2", "mistral", "phi3") and getattr(c, "attention_bias", False)):
    raise NotImplementedError(f"{mt}: attention_bias/mlp_bias checkpoints are not supported")
  rope_global, rope_local, partial = _rope_from_hf(c, mt)
  theta = rope_global.pop("rope_theta", getattr(c, "rope_theta", 10000.0))
  rope_type = rope_global.get("rope_type", "default")
  scaling = None if rope_type == "default" else tuple(sorted(rope_global.items()))
  n_heads = c.num_attention_heads
  head_dim = getattr(c, "head_dim", None) or c.hidden_size // n_heads
  act = getattr(c, "hidden_activation", None) or c.hidden_act
  if act not in _ACTS:
    raise NotImplementedError(f"{mt}: activation {act!r} is not supported")
  if getattr(c, "use_bidirectional_attention", False):
    raise NotImplementedError(f"{mt}: use_bidirectional_attention=True (an encoder) is not supported")
  layer_types = getattr(c, "layer_types", None)
  window = getattr(c, "sliding_window", None)
  if mt in ("mistral", "phi3", "mixtral") and window and not layer_types:  # One window for every layer.
    layer_types = ["sliding_attention"] * c.num_hidden_layers
  eos = c.eos_token_id if hasattr(c, "eos_token_id") else None
  gemma = mt in ("gemma", "gemma2", "gemma3_text")
  kw: dict[str, Any] = dict(
      family=mt, vocab_size=c.vocab_size, hidden_size=c.hidden_size, intermediate_size=c.intermediate_size,
      num_layers=c.num_hidden_layers, num_heads=n_heads, num_kv_heads=getattr(c, "num_key_value_heads", None) or n_heads,
      head_dim=head_dim, rope_theta=float(theta), rope_scaling=scaling, rope_local=rope_local,
      partial_rotary_factor=partial, norm_eps=c.rms_norm_eps,
      norm_offset=gemma, act=_ACTS[act], qkv_bias=mt == "qwen2", qk_norm=mt in ("qwen3", "qwen3_moe", "gemma3_text", "olmo2"),
      qk_norm_all_heads=mt == "olmo2", pre_norms=mt != "olmo2",
      embed_scale=gemma, post_norms=mt in ("gemma2", "gemma3_text", "olmo2"),
      attn_softcap=getattr(c, "attn_logit_softcapping", None), final_softcap=getattr(c, "final_logit_softcapping", None),
      query_scale=getattr(c, "query_pre_attn_scalar", None), sliding_window=window if layer_types else None,
      layer_types=tuple(layer_types) if layer_types and window else None,
      tie_embeddings=bool(getattr(c, "tie_word_embeddings", False)),
      max_position_embeddings=getattr(c, "max_position_embeddings", 4096),
      bos_token_id=getattr(c, "bos_token_id", None), eos_token_id=tuple(eos) if isinstance(eos, list) else eos,
      pad_token_id=getattr(c, "pad_token_id", None))
  if mt in ("qwen3_moe", "mixtral"):
    kw.update(_moe_from_hf(c, mt))
  kw.update(overrides)
  return ModelConfig(**kw)


def _moe_from_hf(c, mt: str) -> dict[str, Any]:
  """The MoE fields of a Qwen3-MoE or Mixtral config; layouts jaxalign does not build are rejected here."""
  if mt == "qwen3_moe":
    if getattr(c, "mlp_only_layers", None) or (getattr(c, "decoder_sparse_step", 1) or 1) != 1:
      raise NotImplementedError(f"{mt}: dense MLP layers among the MoE ones (mlp_only_layers="
                                f"{c.mlp_only_layers}, decoder_sparse_step={c.decoder_sparse_step}) are not supported")
    return dict(num_experts=c.num_experts, experts_per_token=c.num_experts_per_tok,
                expert_size=c.moe_intermediate_size, norm_topk=bool(c.norm_topk_prob),
                router_aux_coef=float(c.router_aux_loss_coef))
  if getattr(c, "router_jitter_noise", 0.0):
    raise NotImplementedError(f"{mt}: router_jitter_noise={c.router_jitter_noise} is not supported (0 in the releases)")
  return dict(num_experts=c.num_local_experts, experts_per_token=c.num_experts_per_tok,
              expert_size=c.intermediate_size, norm_topk=True, router_aux_coef=float(c.router_aux_loss_coef))


def _rope_from_hf(c, mt: str) -> tuple[dict, tuple | None, float]:
  """(global rope parameters, the sliding layers' own ones as sorted items or None, partial rotary factor).

  transformers 5 keeps rope settings in `rope_parameters`: one dict, or (Gemma 3) one per layer type. Types
  the forward cannot compute are rejected here, at load time, not mid-run (rope.check)."""
  from jaxalign.models import rope

  raw = dict(getattr(c, "rope_parameters", None) or {})
  local = None
  if "full_attention" in raw or "sliding_attention" in raw:  # Per layer type.
    full, slide = dict(raw.get("full_attention") or {}), dict(raw.get("sliding_attention") or {})
    if slide and slide != full:
      rope.check(slide, f"{mt} rope_parameters['sliding_attention']")
      local = tuple(sorted((k, v) for k, v in slide.items() if v is not None and not isinstance(v, (dict, list))))
    raw = full
  partial = float(raw.pop("partial_rotary_factor", None) or getattr(c, "partial_rotary_factor", None) or 1.0)
  rope.check(raw, f"{mt} rope_parameters")
  glob = {k: v for k, v in raw.items() if v is not None and not isinstance(v, (dict, list))}
  return glob, local, partial


def config_to_hf(cfg: ModelConfig, *, sequence_classification: bool = False):
  """A transformers config object for `cfg`."""
  import transformers

  rope: dict[str, Any] = {"rope_theta": cfg.rope_theta, **dict(cfg.rope_scaling or ())}
  rope.setdefault("rope_type", "default")
  if cfg.partial_rotary_factor != 1.0:
    rope["partial_rotary_factor"] = cfg.partial_rotary_factor
  if cfg.family == "gemma3_text":
    local = {"rope_type": "default", **dict(cfg.rope_local or ())} if cfg.rope_local else dict(rope)
    rope = {"full_attention": rope, "sliding_attention": local}
  act = {"gelu_tanh": "gelu_pytorch_tanh", "gelu": "gelu"}.get(cfg.act, "silu")
  kw: dict[str, Any] = dict(
      vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size, intermediate_size=cfg.intermediate_size,
      num_hidden_layers=cfg.num_layers, num_attention_heads=cfg.num_heads, num_key_value_heads=cfg.num_kv_heads,
      head_dim=cfg.head_dim, rms_norm_eps=cfg.norm_eps, rope_parameters=rope, tie_word_embeddings=cfg.tie_embeddings,
      max_position_embeddings=cfg.max_position_embeddings, bos_token_id=cfg.bos_token_id,
      eos_token_id=list(cfg.eos_token_id) if isinstance(cfg.eos_token_id, tuple) else cfg.eos_token_id,
      pad_token_id=cfg.pad_token_id)
  if cfg.family in ("gemma", "gemma2", "gemma3_text"):
    kw["hidden_activation"] = act
  kw["hidden_act"] = act
  if cfg.family in ("mistral", "qwen2", "gemma2", "gemma3_text", "phi3"):
    kw["sliding_window"] = cfg.sliding_window
  if cfg.family in ("qwen2", "qwen3", "gemma2", "gemma3_text"):
    kw["layer_types"] = list(cfg.layer_types) if cfg.layer_types else ["full_attention"] * cfg.num_layers
    if cfg.family in ("qwen2", "qwen3"):
      kw["use_sliding_window"] = bool(cfg.sliding_window and cfg.layer_types)
  if cfg.family in ("gemma2", "gemma3_text"):
    kw.update(query_pre_attn_scalar=cfg.query_scale or cfg.head_dim, attn_logit_softcapping=cfg.attn_softcap,
              final_logit_softcapping=cfg.final_softcap)
  if cfg.family in ("qwen3_moe", "mixtral"):
    kw.update(num_experts_per_tok=cfg.experts_per_token, router_aux_loss_coef=cfg.router_aux_coef)
    if cfg.family == "qwen3_moe":
      kw.update(num_experts=cfg.num_experts, moe_intermediate_size=cfg.expert_size, norm_topk_prob=cfg.norm_topk)
    else:
      if not cfg.norm_topk:
        raise ValueError("mixtral: Mixtral always renormalises its top-k weights; norm_topk=False cannot be exported")
      kw.update(num_local_experts=cfg.num_experts, intermediate_size=cfg.expert_size)
  if cfg.family in ("mistral", "mixtral"):
    kw["sliding_window"] = cfg.sliding_window
  if sequence_classification:
    kw["num_labels"] = 1
  c = transformers.AutoConfig.for_model(cfg.family, **kw)
  arch = {"llama": "Llama", "mistral": "Mistral", "qwen2": "Qwen2", "qwen3": "Qwen3", "gemma": "Gemma",
          "gemma2": "Gemma2", "gemma3_text": "Gemma3Text" if sequence_classification else "Gemma3",
          "phi3": "Phi3", "olmo2": "Olmo2", "qwen3_moe": "Qwen3Moe", "mixtral": "Mixtral"}[cfg.family]
  c.architectures = [arch + ("ForSequenceClassification" if sequence_classification else "ForCausalLM")]
  c.dtype = cfg.param_dtype
  return c


# ----------------------------------------------------------------------------------------------- name mapping

def _layer_map(cfg: ModelConfig) -> dict[str, tuple[str, Callable]]:
  """Our stacked layer param -> (HF per-layer suffix, transform HF->ours)."""
  d, n, k, h = cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
  m = {
      "wq": ("self_attn.q_proj.weight", lambda w: w.T.reshape(d, n, h)),
      "wk": ("self_attn.k_proj.weight", lambda w: w.T.reshape(d, k, h)),
      "wv": ("self_attn.v_proj.weight", lambda w: w.T.reshape(d, k, h)),
      "wo": ("self_attn.o_proj.weight", lambda w: w.T.reshape(n, h, d)),
      "w_gate": ("mlp.gate_proj.weight", lambda w: w.T),
      "w_up": ("mlp.up_proj.weight", lambda w: w.T),
      "w_down": ("mlp.down_proj.weight", lambda w: w.T),
  }
  f = cfg.intermediate_size
  if cfg.family == "phi3":  # Fused projections: rows [q; k; v] and [gate; up].
    m["wq"] = ("self_attn.qkv_proj.weight", lambda w: w[:n * h].T.reshape(d, n, h))
    m["wk"] = ("self_attn.qkv_proj.weight", lambda w: w[n * h:(n + k) * h].T.reshape(d, k, h))
    m["wv"] = ("self_attn.qkv_proj.weight", lambda w: w[(n + k) * h:].T.reshape(d, k, h))
    m["w_gate"] = ("mlp.gate_up_proj.weight", lambda w: w[:f].T)
    m["w_up"] = ("mlp.gate_up_proj.weight", lambda w: w[f:].T)
  if cfg.num_experts:  # Per-expert tensors on disk (transformers fuses them only in memory).
    for k_ in ("w_gate", "w_up", "w_down"):
      del m[k_]
    moe_names = {"mixtral": ("block_sparse_moe", "w1", "w3", "w2")}.get(cfg.family, ("mlp", "gate_proj", "up_proj",
                                                                                    "down_proj"))
    blk, gate, up, down = moe_names
    m["router"] = (f"{blk}.gate.weight", lambda w: w.T)
    m["moe_gate"] = (f"{blk}.experts.{{e}}.{gate}.weight", lambda w: w.T)
    m["moe_up"] = (f"{blk}.experts.{{e}}.{up}.weight", lambda w: w.T)
    m["moe_down"] = (f"{blk}.experts.{{e}}.{down}.weight", lambda w: w.T)
  if cfg.pre_norms:
    m["attn_norm"] = ("input_layernorm.weight", lambda w: w)
  if cfg.pre_norms and cfg.post_norms:  # Gemma 2/3 naming.
    m["post_attn_norm"] = ("post_attention_layernorm.weight", lambda w: w)
    m["mlp_norm"] = ("pre_feedforward_layernorm.weight", lambda w: w)
    m["post_mlp_norm"] = ("post_feedforward_layernorm.weight", lambda w: w)
  elif cfg.post_norms:  # OLMo 2: norms after each sublayer only.
    m["post_attn_norm"] = ("post_attention_layernorm.weight", lambda w: w)
    m["post_mlp_norm"] = ("post_feedforward_layernorm.weight", lambda w: w)
  else:
    m["mlp_norm"] = ("post_attention_layernorm.weight", lambda w: w)
  if cfg.qkv_bias:
    m["bq"] = ("self_attn.q_proj.bias", lambda w: w.reshape(n, h))
    m["bk"] = ("self_attn.k_proj.bias", lambda w: w.reshape(k, h))
    m["bv"] = ("self_attn.v_proj.bias", lambda w: w.reshape(k, h))
  if cfg.qk_norm and cfg.qk_norm_all_heads:
    m["q_norm"] = ("self_attn.q_norm.weight", lambda w: w.reshape(n, h))
    m["k_norm"] = ("self_attn.k_norm.weight", lambda w: w.reshape(k, h))
  elif cfg.qk_norm:
    m["q_norm"] = ("self_attn.q_norm.weight", lambda w: w)
    m["k_norm"] = ("self_attn.k_norm.weight", lambda w: w)
  return m


def _inverse(cfg: ModelConfig, name: str, w: np.ndarray) -> np.ndarray:
  """Ours -> HF layout for one layer's slice of a stacked param."""
  if name in ("wq", "wk", "wv"):
    return w.reshape(w.shape[0], -1).T
  if name == "wo":
    return w.reshape(-1, w.shape[-1]).T
  if name in ("w_gate", "w_up", "w_down", "router", "moe_gate", "moe_up", "moe_down"):
    return w.T
  if name in ("bq", "bk", "bv") or (name in ("q_norm", "k_norm") and w.ndim == 2):
    return w.reshape(-1)
  return w


def hf_names(cfg: ModelConfig) -> dict[tuple[str, ...], list[str]]:
  """Flat param path -> the HF tensor names that make it (one per layer for stacked params)."""
  out = {("embed",): ["model.embed_tokens.weight"], ("final_norm",): ["model.norm.weight"]}
  if not cfg.tie_embeddings:
    out[("lm_head",)] = ["lm_head.weight"]
  for ours, (suffix, _) in _layer_map(cfg).items():
    if "{e}" in suffix:  # Per layer and per expert, layer-major: [L * E] names for an [L, E, ...] param.
      out[("layers", ours)] = [f"model.layers.{i}.{suffix.format(e=e)}" for i in range(cfg.num_layers)
                               for e in range(cfg.num_experts)]
    else:
      out[("layers", ours)] = [f"model.layers.{i}.{suffix}" for i in range(cfg.num_layers)]
  return out


# ----------------------------------------------------------------------------------------------- safetensors IO

class SafetensorsDir:
  """Memory-mapped tensors of a checkpoint directory, by name (single file or index-sharded)."""

  def __init__(self, path: str):
    self.path = path
    self.remote = paths.is_remote(path)
    index = paths.join(path, "model.safetensors.index.json")
    single = paths.join(path, "model.safetensors")
    if paths.exists(index):
      files = sorted(set(json.loads(paths.read_text(index))["weight_map"].values()))
    elif paths.exists(single):
      files = ["model.safetensors"]
    else:
      raise FileNotFoundError(f"{path}: no model.safetensors or model.safetensors.index.json "
                              "(only safetensors checkpoints are supported; convert .bin with transformers)")
    self._where: dict[str, tuple[str, dict, int]] = {}
    for fn in files:
      full = paths.join(path, fn)
      with paths.open(full, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(n))
      header.pop("__metadata__", None)
      for name, info in header.items():
        self._where[name] = (full, info, 8 + n)

  def __contains__(self, name: str) -> bool:
    return name in self._where

  def names(self) -> list[str]:
    return list(self._where)

  def shape(self, name: str) -> tuple[int, ...]:
    return tuple(self._info(name)[1]["shape"])

  def _info(self, name: str):
    if name not in self._where:
      raise KeyError(f"{self.path}: tensor {name!r} not found in the checkpoint")
    return self._where[name]

  def get(self, name: str, rows: slice | None = None) -> np.ndarray:
    """The tensor (or its first-axis `rows`): a view of the memory map, or one ranged read of just those bytes."""
    full, info, base = self._info(name)
    start = info["data_offsets"][0]
    dtype = np.dtype(_ST_DTYPES[info["dtype"]])
    shape = tuple(info["shape"])
    if not self.remote:
      w = np.memmap(full, dtype=dtype, mode="r", offset=base + start, shape=shape)
      return w if rows is None else w[rows]
    lo, hi = (0, shape[0] if shape else 1) if rows is None else rows.indices(shape[0])[:2]
    if rows is not None and rows.step not in (None, 1):
      raise ValueError(f"SafetensorsDir.get: rows must be contiguous, got {rows}")
    hi = max(lo, hi)
    row_bytes = dtype.itemsize * int(np.prod(shape[1:], dtype=np.int64))
    with paths.open(full, "rb") as f:
      f.seek(base + start + lo * row_bytes)
      raw = f.read((hi - lo) * row_bytes)
    if len(raw) != (hi - lo) * row_bytes:
      raise OSError(f"{full}: tensor {name!r} truncated ({len(raw)} of {(hi - lo) * row_bytes} bytes)")
    w = np.frombuffer(raw, dtype=dtype)
    return w.reshape(shape) if rows is None else w.reshape((hi - lo,) + shape[1:])


def write_safetensors(path: str, tensors: dict[str, np.ndarray], metadata: dict[str, str] | None = None):
  header: dict[str, Any] = {"__metadata__": metadata or {"format": "pt"}}
  offset = 0
  for name, arr in tensors.items():
    nbytes = arr.size * arr.dtype.itemsize
    header[name] = {"dtype": _ST_NAMES[np.dtype(arr.dtype)], "shape": list(arr.shape),
                    "data_offsets": [offset, offset + nbytes]}
    offset += nbytes
  raw = json.dumps(header, separators=(",", ":")).encode()
  raw += b" " * (-len(raw) % 8)
  with paths.open(path, "wb") as f:
    f.write(struct.pack("<Q", len(raw)))
    f.write(raw)
    for arr in tensors.values():
      f.write(np.ascontiguousarray(arr).tobytes())


# ----------------------------------------------------------------------------------------------- load / save

def _flat(tree, prefix=()) -> Iterator[tuple[tuple[str, ...], Any]]:
  if isinstance(tree, dict):
    for k, v in tree.items():
      yield from _flat(v, prefix + (k,))
  else:
    yield prefix, tree


def _set(tree: dict, path: tuple[str, ...], value):
  for k in path[:-1]:
    tree = tree.setdefault(k, {})
  tree[path[-1]] = value


def _sources(st: SafetensorsDir, cfg: ModelConfig, path: str,
             dtype) -> Iterator[tuple[tuple[str, ...], tuple, Callable]]:
  """(our path, global shape, read) per param; read(idx) -> just that box of ours, in `dtype`, from the files.

  A stacked param's box reads the layers in its first slice (one HF tensor at a time, the rest of the box
  applied to each after the HF->ours transform); the others read only the HF rows the box covers."""
  layer_map = _layer_map(cfg)
  for ours, names in hf_names(cfg).items():
    if ours[0] == "layers":
      fn = layer_map[ours[1]][1]
      layer_shape = jax.eval_shape(fn, jax.ShapeDtypeStruct(st.shape(names[0]), dtype)).shape
      lead = (cfg.num_layers, cfg.num_experts) if "{e}" in layer_map[ours[1]][0] else (len(names),)
      yield ours, lead + tuple(layer_shape), _stacked_reader(st, names, fn, lead + tuple(layer_shape), dtype)
    elif ours == ("lm_head",) and names[0] not in st:
      if "score.weight" not in st:
        raise KeyError(f"{path}: lm_head.weight missing and tie_word_embeddings is false")
      shape = (cfg.hidden_size, cfg.vocab_size)  # A *ForSequenceClassification checkpoint: no LM head.
      yield ours, shape, lambda idx, shape=shape: np.zeros(_box(idx, shape), dtype)
    elif ours == ("lm_head",):  # Ours is HF's transpose: our columns are its rows.
      yield ours, st.shape(names[0])[::-1], lambda idx, n=names[0]: np.asarray(st.get(n, rows=idx[1]).T[idx[0]], dtype)
    else:
      shape = st.shape(names[0])
      yield ours, shape, lambda idx, n=names[0]: np.asarray(st.get(n, rows=idx[0])[(slice(None),) + idx[1:]], dtype)


def _box(idx: tuple, shape: tuple) -> tuple[int, ...]:
  return tuple(len(range(*s.indices(d))) for s, d in zip(idx, shape))


def _stacked_reader(st: SafetensorsDir, names: list[str], fn: Callable, shape: tuple, dtype) -> Callable:
  # The last layer read, shared by the devices that hold slices of it: one layer at most (a view of the memory
  # map locally, one ranged read of a remote file).
  held: dict[str, np.ndarray] = {}

  def layer(name):
    if name not in held:
      held.clear()
      held[name] = fn(st.get(name))  # A view: transposes and reshapes of the memory map copy nothing.
    return held[name]

  if len(shape) > 1 and len(names) == shape[0] * shape[1] and len(names) != shape[0]:  # [L, E, ...] experts.
    def read_experts(idx):
      out = np.empty(_box(idx, shape), dtype)
      for j, i in enumerate(range(*idx[0].indices(shape[0]))):
        for jj, e in enumerate(range(*idx[1].indices(shape[1]))):
          out[j, jj] = layer(names[i * shape[1] + e])[idx[2:]]
      return out
    return read_experts

  def read(idx):
    out = np.empty(_box(idx, shape), dtype)
    for j, i in enumerate(range(*idx[0].indices(len(names)))):
      out[j] = layer(names[i])[idx[1:]]  # Converted to `dtype` as it is copied, slice by slice.
    return out

  return read


@functools.cache
def _write_piece(axis: int, sharding):
  """buf[..., start:start + n, ...] = piece along `axis`, in place (buf donated)."""
  def write(buf, piece, start):
    return jax.lax.dynamic_update_slice_in_dim(buf, piece, start, axis)
  return jax.jit(write, donate_argnums=0, out_shardings=sharding)


def _split_axis(shape: tuple, sharding) -> int | None:
  """The first axis (of size > 1) that no device splits: pieces along it keep every device's layout."""
  shard = shape if sharding is None else sharding.shard_shape(shape)
  return next((a for a, (n, s) in enumerate(zip(shape, shard)) if n > 1 and n == s), None)


def piece_rows(shape: tuple, sharding, dtype, max_piece_bytes: int) -> tuple[int | None, int]:
  """(axis, rows per piece) in which a param of `shape` is loaded: pieces of at most `max_piece_bytes` along an
  axis no device splits (one piece, axis None, when it is small enough or every axis is split)."""
  nbytes = math.prod(shape) * np.dtype(dtype).itemsize
  axis = _split_axis(shape, sharding)
  if axis is None or nbytes <= max_piece_bytes:
    return None, 0
  return axis, max(1, max_piece_bytes * shape[axis] // nbytes)


def _place(shape: tuple, dtype, sharding, read: Callable, max_piece_bytes: int):
  """The global array `read` describes, built piece by piece so the host holds at most one piece.

  Each piece is a global array whose addressable shards are read by their index (each host reads only its
  devices' slices; slices several devices share are read once), then written in place into the final buffer;
  the next piece is read only once that write has finished, so host memory never holds two."""
  axis, rows = piece_rows(shape, sharding, dtype, max_piece_bytes)

  def array(piece_shape, read_piece):
    if sharding is None:  # Uncommitted on the default device, as `jnp.asarray` places it.
      return jax.numpy.asarray(read_piece(tuple(slice(0, n) for n in piece_shape)))
    seen: dict = {}

    def cb(idx):
      key = tuple(s.indices(n) for s, n in zip(idx, piece_shape))
      if key not in seen:
        seen[key] = read_piece(tuple(slice(*k) for k in key))
      return seen[key]
    return jax.make_array_from_callback(piece_shape, sharding, cb)

  if axis is None:
    return array(shape, read)
  if sharding is None:
    buf = jax.numpy.zeros(shape, dtype)
  else:
    buf = jax.numpy.zeros(shape, dtype, device=sharding)
  for start in range(0, shape[axis], rows):
    n = min(rows, shape[axis] - start)

    def read_piece(idx, start=start, n=n):
      s = idx[axis].indices(n)
      return read(idx[:axis] + (slice(start + s[0], start + s[1]),) + idx[axis + 1:])

    piece = array(shape[:axis] + (n,) + shape[axis + 1:], read_piece)
    buf = _write_piece(axis, sharding)(buf, piece, start)
    del piece
    buf.block_until_ready()
  return buf


def max_layer_bytes(cfg: ModelConfig, dtype=None) -> int:
  """Bytes of the largest per-layer tensor (in `dtype`): the most `load_params` holds on a host at once."""
  dtype = np.dtype(dtype or cfg.param_dtype)
  d, f, n, k, h = cfg.hidden_size, cfg.intermediate_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
  return max(d * f, d * n * h, d * k * h) * dtype.itemsize


def load_params(path: str, cfg: ModelConfig, shardings=None, *, dtype=None) -> dict:
  """Params of `cfg` from the HF directory `path`, each placed with its sharding (a matching tree).

  Host memory is bounded by one per-layer tensor: every param is read and placed in pieces of at most
  `max_layer_bytes` (a stacked param one layer at a time; embeddings in row blocks), and each host reads only
  the slices its own devices hold. Why: a stacked 70B MLP weight is 75 GB in float32; building it whole on
  every host, as this did before, does not fit."""
  st = SafetensorsDir(path)
  dtype = np.dtype(dtype or cfg.param_dtype)
  flat_shardings = dict(_flat(shardings)) if shardings is not None else {}
  bound = max_layer_bytes(cfg, dtype)
  params: dict = {}
  for ours, shape, read in _sources(st, cfg, path, dtype):
    _set(params, ours, _place(tuple(shape), dtype, flat_shardings.get(ours), read, bound))
  return params


def load_score_head(path: str, cfg: ModelConfig, sharding=None) -> dict | None:
  """The scalar head of an HF *ForSequenceClassification checkpoint (num_labels=1), or None."""
  st = SafetensorsDir(path)
  if "score.weight" not in st:
    return None
  if st.shape("score.weight") != (1, cfg.hidden_size):
    raise ValueError(f"{path}: score.weight has shape {st.shape('score.weight')}; a reward model needs num_labels=1")
  dtype = np.dtype(cfg.param_dtype)

  def read(idx):  # One [d] vector.
    return np.asarray(st.get("score.weight")[0][idx], dtype)
  return {"w": _place((cfg.hidden_size,), dtype, None if sharding is None else sharding["w"], read,
                      max_layer_bytes(cfg, dtype))}


def hf_tensors(cfg: ModelConfig, params: dict, dtype=None) -> Iterator[tuple[str, np.ndarray]]:
  """(HF name, host array) pairs, one stacked param (or fused group of them) at a time.

  Params that share an HF tensor (Phi-3's qkv_proj and gate_up_proj) are concatenated along its rows in
  `_layer_map` order."""
  flat = dict(_flat(params))
  dtype = np.dtype(dtype or cfg.param_dtype)
  by_hf: dict[str, list[tuple[str, ...]]] = {}
  names_of = hf_names(cfg)
  for ours, names in names_of.items():
    by_hf.setdefault(names[0], []).append(ours)
  for members in by_hf.values():
    names = names_of[members[0]]
    if members[0][0] == "layers":
      hosts = [to_host(flat[o]).astype(dtype) for o in members]
      hosts = [h if h.shape[0] == len(names) else h.reshape((len(names),) + h.shape[2:]) for h in hosts]  # [L, E]
      for i, n in enumerate(names):
        parts = [_inverse(cfg, o[1], h[i]) for o, h in zip(members, hosts)]
        yield n, np.ascontiguousarray(parts[0] if len(parts) == 1 else np.concatenate(parts, axis=0))
    else:
      host = to_host(flat[members[0]]).astype(dtype)
      yield names[0], np.ascontiguousarray(host.T if members[0] == ("lm_head",) else host)


def save_params(path: str, cfg: ModelConfig, params: dict, *, head: dict | None = None, dtype=None,
                max_shard_bytes: int = 4 << 30, tokenizer=None):
  """Write an HF checkpoint directory; with `head` (scalar head params) a SequenceClassification model.

  LoRA params (adapters present, `cfg.lora_rank` > 0) are merged into the base weights first: a transformers
  checkpoint has no place for them, and writing the base alone would silently drop the training."""
  has_adapters = any(k.startswith("lora_") for k in params.get("layers", {}))
  if has_adapters or cfg.lora_rank:
    from jaxalign.models import lora
    if not (has_adapters and cfg.lora_rank):
      raise ValueError(f"hf.save_params: params {'hold' if has_adapters else 'lack'} LoRA adapters but the model "
                       f"config has lora_rank={cfg.lora_rank}; pass the config the params were made with")
    params = lora.merge(cfg, params)
    cfg = cfg.replace(lora_rank=0)
  seqcls = head is not None
  shards: list[dict[str, np.ndarray]] = [{}]
  size = 0
  tensors = hf_tensors(cfg, params, dtype)
  if seqcls:  # The classification model has no LM head; add the score layer.
    tensors = ((n, w) for n, w in tensors if n != "lm_head.weight")
  for name, arr in tensors:
    if size and size + arr.nbytes > max_shard_bytes:
      shards.append({})
      size = 0
    shards[-1][name] = arr
    size += arr.nbytes
  if seqcls:
    w = to_host(head["w"]).astype(dtype or cfg.param_dtype).reshape(1, -1)
    shards[-1]["score.weight"] = w
  if jax.process_index() == 0:
    paths.makedirs(path)
    if len(shards) == 1:
      write_safetensors(paths.join(path, "model.safetensors"), shards[0])
    else:
      weight_map, total = {}, 0
      for i, sh in enumerate(shards):
        fn = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        write_safetensors(paths.join(path, fn), sh)
        for n, a in sh.items():
          weight_map[n] = fn
          total += a.nbytes
      paths.write_json(paths.join(path, "model.safetensors.index.json"),
                       {"metadata": {"total_size": total}, "weight_map": weight_map})
    with paths.writable_dir(path) as d:
      config_to_hf(cfg, sequence_classification=seqcls).save_pretrained(d)
      if tokenizer is not None:
        tokenizer.save_pretrained(d)
