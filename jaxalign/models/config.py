"""Model configuration: one dataclass whose fields select the decoder family (Llama, Mistral, Qwen2/3, Gemma 1/2/3,
Phi-3, OLMo 2)."""

from __future__ import annotations

import dataclasses
from typing import Any

# transformers model_type names.
FAMILIES = ("llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "gemma3_text", "phi3", "olmo2", "qwen3_moe",
            "mixtral")
# Adapter factor shapes per target, as (A dims, B dims) einsum letters: d hidden, n/k heads, h head dim, f mlp.
LORA_SHAPES = {"wq": ("d", "nh"), "wk": ("d", "kh"), "wv": ("d", "kh"), "wo": ("nh", "d"),
               "w_gate": ("d", "f"), "w_up": ("d", "f"), "w_down": ("f", "d")}


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  """Architecture of a decoder-only transformer; the family name only picks HF export names."""

  vocab_size: int = 256
  hidden_size: int = 64
  intermediate_size: int = 172
  num_layers: int = 2
  num_heads: int = 4
  num_kv_heads: int = 2
  head_dim: int = 16
  family: str = "llama"
  rope_theta: float = 10000.0
  rope_scaling: tuple[tuple[str, Any], ...] | None = None  # HF rope_parameters minus theta, as sorted items.
  # Gemma 3: the sliding-window layers' own rope parameters (with rope_theta), as sorted items; None = global.
  rope_local: tuple[tuple[str, Any], ...] | None = None
  partial_rotary_factor: float = 1.0  # Phi-4-mini 0.75: only the first head dims rotate.
  norm_eps: float = 1e-5
  norm_offset: bool = False  # Gemma: RMSNorm scales by (1 + w).
  act: str = "silu"  # 'silu' (SwiGLU), 'gelu_tanh' (GeGLU, tanh form) or 'gelu' (GeGLU, exact erf form).
  qkv_bias: bool = False  # Qwen2.
  qk_norm: bool = False  # Qwen3, Gemma 3: RMSNorm over head_dim on q and k before RoPE.
  qk_norm_all_heads: bool = False  # OLMo 2: the q/k norms run over all heads' dims at once (weights [N*H]).
  pre_norms: bool = True  # False for OLMo 2: no norm before attention or the MLP (post_norms only).
  embed_scale: bool = False  # Gemma: embeddings times sqrt(hidden_size).
  post_norms: bool = False  # Gemma 2/3, OLMo 2: norms after attention and after the MLP.
  attn_softcap: float | None = None  # Gemma 2: tanh soft-capping of attention scores.
  final_softcap: float | None = None  # Gemma 2: tanh soft-capping of logits.
  query_scale: float | None = None  # Gemma 2 query_pre_attn_scalar; default head_dim.
  sliding_window: int | None = None
  layer_types: tuple[str, ...] | None = None  # Per layer 'full_attention' | 'sliding_attention'.
  tie_embeddings: bool = False
  # Mixture-of-Experts (Qwen3-MoE, Mixtral; models/moe.py): every layer's MLP is `num_experts` experts of
  # width `expert_size`, `experts_per_token` of them per token.
  num_experts: int = 0
  experts_per_token: int = 2
  expert_size: int = 0
  norm_topk: bool = True  # Renormalise the top-k router weights (Mixtral; Qwen3-MoE's norm_topk_prob).
  router_aux_coef: float = 0.0  # Weight of the load-balancing loss in training losses (HF router_aux_loss_coef).
  moe_impl: str = "auto"  # Grouped matmul: auto (megablox on TPU, ragged_dot on GPU, tiled on CPU) | tiled | ragged | megablox.
  max_position_embeddings: int = 4096
  bos_token_id: int | None = None
  eos_token_id: int | tuple[int, ...] | None = None
  pad_token_id: int | None = None
  param_dtype: str = "float32"
  dtype: str = "float32"  # Matmul dtype (bfloat16 on accelerators); logits and softmax stay float32.
  remat: str = "none"  # 'none' | 'full' (recompute each layer) | 'dots' (keep matmul outputs) | 'offload' (to host).
  scan_layers: bool = True  # lax.scan over the stacked layers (and LM-head tiles): compile time independent of depth.
  # 'auto': splash on TPU, cuDNN on GPU (bf16), else fused unless soft-capped | 'fused' (hand-written backward) |
  # 'dense' | 'splash' (the Pallas TPU kernel; Pallas interpret mode off TPU: for tests) | 'cudnn' (GPU).
  attention: str = "auto"
  vocab_tiles: int = 0  # LM head log-probs over this many vocabulary tiles (0 = auto: 1 up to 32k tokens).
  fused_head: bool = True  # SFT's loss over a tiled head: gradients made in the forward (Transformer.weighted_logprob_sum).
  causal_blocks: bool = True  # Without a KV cache, skip key blocks after each query block (exact; faster).
  lora_rank: int = 0  # > 0 adds low-rank adapters (B = 0 at init) to `lora_targets`.
  lora_alpha: float = 16.0  # Adapter scale alpha / rank.
  lora_targets: tuple[str, ...] = ("wq", "wk", "wv", "wo")  # Any of wq wk wv wo w_gate w_up w_down.

  def __post_init__(self):
    if self.family not in FAMILIES:
      raise ValueError(f"model.family={self.family!r}: expected one of {FAMILIES}")
    if self.num_heads % self.num_kv_heads:
      raise ValueError(f"num_heads={self.num_heads} is not a multiple of num_kv_heads={self.num_kv_heads}")
    if self.act not in ("silu", "gelu_tanh", "gelu"):
      raise ValueError(f"act={self.act!r}: expected 'silu', 'gelu_tanh' or 'gelu'")
    if self.vocab_tiles < 0 or (self.vocab_tiles and self.vocab_size % self.vocab_tiles):
      raise ValueError(f"vocab_tiles={self.vocab_tiles}: must divide vocab_size={self.vocab_size} (0 = auto)")
    if self.remat not in ("none", "full", "dots", "offload"):
      raise ValueError(f"remat={self.remat!r}: expected none|full|dots|offload")
    if self.attention not in ("auto", "dense", "fused", "splash", "cudnn"):
      raise ValueError(f"attention={self.attention!r}: expected auto|dense|fused|splash|cudnn")
    bad = set(self.lora_targets) - set(LORA_SHAPES)
    if bad:
      raise ValueError(f"lora_targets {sorted(bad)}: expected a subset of {sorted(LORA_SHAPES)}")
    if self.layer_types is not None and len(self.layer_types) != self.num_layers:
      raise ValueError(f"layer_types has {len(self.layer_types)} entries for {self.num_layers} layers")
    if not 0 < self.partial_rotary_factor <= 1 or int(self.head_dim * self.partial_rotary_factor) % 2:
      raise ValueError(f"partial_rotary_factor={self.partial_rotary_factor}: must rotate an even number of the "
                       f"{self.head_dim} head dims")
    if self.moe_impl not in ("auto", "tiled", "ragged", "megablox"):
      raise ValueError(f"moe_impl={self.moe_impl!r}: expected auto|tiled|ragged|megablox")
    if self.num_experts:
      if not 0 < self.experts_per_token <= self.num_experts or self.expert_size <= 0:
        raise ValueError(f"num_experts={self.num_experts}, experts_per_token={self.experts_per_token}, "
                         f"expert_size={self.expert_size}: need 0 < experts_per_token <= num_experts and expert_size > 0")
      if {"w_gate", "w_up", "w_down"} & set(self.lora_targets) and self.lora_rank:
        raise ValueError("lora_targets: the MLP of a Mixture-of-Experts model is its experts, which LoRA does not "
                         "adapt here; target the attention projections (wq wk wv wo)")
    if not (self.pre_norms or self.post_norms):
      raise ValueError("pre_norms and post_norms are both off: a block needs one of them")
    from jaxalign.models import rope  # The rope kinds live with their maths.
    rope.check({"rope_theta": self.rope_theta, **dict(self.rope_scaling or ())}, "model.rope_scaling")
    if self.rope_local is not None:
      rope.check(dict(self.rope_local), "model.rope_local")

  def window_sizes(self) -> list[int]:
    """Per-layer attention window in tokens (0 means full attention)."""
    out = []
    for i in range(self.num_layers):
      kind = self.layer_types[i] if self.layer_types else ("sliding_attention" if self.sliding_window else "full_attention")
      out.append(int(self.sliding_window) if kind == "sliding_attention" and self.sliding_window else 0)
    return out

  def head_tiles(self) -> int:
    """Vocabulary tiles of the LM head's log-probs (losses.lm.head_logprobs): `vocab_tiles`, or by default
    1 up to a 32k vocabulary (the dense head: fastest for small ones) and else the fewest tiles of at most
    16,384 tokens that divide the vocabulary (a 4k row's tile of float32 logits: 256 MiB)."""
    if self.vocab_tiles:
      return self.vocab_tiles
    v = self.vocab_size
    if v <= 32768:
      return 1
    return next(n for n in range(-(-v // 16384), v + 1) if v % n == 0)

  def replace(self, **kw) -> "ModelConfig":
    return dataclasses.replace(self, **kw)

  def num_params(self) -> int:
    d, f, v, l = self.hidden_size, self.intermediate_size, self.vocab_size, self.num_layers
    attn = d * self.head_dim * (2 * self.num_heads + 2 * self.num_kv_heads)
    mlp = (3 * d * self.expert_size * self.num_experts + d * self.num_experts) if self.num_experts else 3 * d * f
    per_layer = attn + mlp + (2 * self.pre_norms + 2 * self.post_norms) * d
    return v * d * (1 if self.tie_embeddings else 2) + l * per_layer + d


def preset(name: str, **overrides) -> ModelConfig:
  """Tiny named configs for tests, quickstart and benchmarks."""
  presets = {
      "tiny": dict(vocab_size=256, hidden_size=64, intermediate_size=172, num_layers=2, num_heads=4,
                   num_kv_heads=2, head_dim=16),
      "small": dict(vocab_size=512, hidden_size=128, intermediate_size=344, num_layers=4, num_heads=4,
                    num_kv_heads=2, head_dim=32),
      # The fixed benchmark workload of issue 8.
      "bench": dict(vocab_size=2048, hidden_size=256, intermediate_size=688, num_layers=4, num_heads=8,
                    num_kv_heads=4, head_dim=32, rope_theta=10000.0, norm_eps=1e-5),
      "llama-1b": dict(vocab_size=128256, hidden_size=2048, intermediate_size=8192, num_layers=16, num_heads=32,
                       num_kv_heads=8, head_dim=64, rope_theta=500000.0, tie_embeddings=True,
                       rope_scaling=(("factor", 32.0), ("high_freq_factor", 4.0), ("low_freq_factor", 1.0),
                                     ("original_max_position_embeddings", 8192), ("rope_type", "llama3"))),
  }
  if name not in presets:
    raise ValueError(f"model preset {name!r}: expected one of {sorted(presets)}")
  return ModelConfig(**{**presets[name], **overrides})
