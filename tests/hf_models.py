"""Tiny random-weight `transformers` models of every supported family, saved with save_pretrained."""

from __future__ import annotations

import torch
import transformers

TINY = dict(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=3, num_attention_heads=4,
            num_key_value_heads=2, head_dim=16, max_position_embeddings=256)

FAMILY_KW = {
    "llama": dict(rope_parameters={"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0,
                                   "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                   "original_max_position_embeddings": 16}),
    "mistral": dict(sliding_window=5),
    "qwen2": dict(tie_word_embeddings=True),
    "qwen3": dict(),
    "gemma": dict(),
    "gemma2": dict(sliding_window=4, attn_logit_softcapping=20.0, final_logit_softcapping=10.0,
                   query_pre_attn_scalar=24),
    # Two rope sets (a scaled global one for full layers, the local base for sliding ones), q/k norms, 4 norms.
    "gemma3_text": dict(sliding_window=4, query_pre_attn_scalar=24,
                        layer_types=["sliding_attention", "sliding_attention", "full_attention"],
                        rope_parameters={"full_attention": {"rope_type": "linear", "factor": 2.0, "rope_theta": 1e6},
                                         "sliding_attention": {"rope_type": "default", "rope_theta": 10000.0}}),
    # Fused qkv/gate_up projections, Phi-4-mini's partial rotary factor, one window for all layers.
    "phi3": dict(sliding_window=6, pad_token_id=0,
                 rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.75}),
    "olmo2": dict(),  # Post-norms only; q/k norms over all heads.
    # Experts as the releases route them: Qwen3-30B-A3B renormalises its top-k (the config default does not).
    "qwen3_moe": dict(num_experts=8, num_experts_per_tok=2, moe_intermediate_size=32, norm_topk_prob=True),
    "mixtral": dict(num_local_experts=4, num_experts_per_tok=2, intermediate_size=48, sliding_window=5),
}


def save_random(family: str, path: str, seq_cls: bool = False, **kw) -> str:
  torch.manual_seed(0)
  cfg = transformers.AutoConfig.for_model(family, **{**TINY, **FAMILY_KW[family], **kw})
  cfg._attn_implementation = "eager"
  cls = transformers.AutoModelForSequenceClassification if seq_cls else transformers.AutoModelForCausalLM
  if seq_cls:
    cfg.num_labels = 1
    cfg.pad_token_id = 0
  model = cls.from_config(cfg, dtype=torch.float32)
  with torch.no_grad():  # Non-trivial norms and biases, so a mapping mistake cannot hide behind ones/zeros.
    for name, p in model.named_parameters():
      if "norm" in name or name.endswith("bias"):  # (HF zero-initialises routers: every expert would tie.)
        p.add_(0.1 * torch.randn_like(p))
      else:
        p.normal_(0.0, 0.08)
  model.save_pretrained(path)
  return path


def load(path: str, seq_cls: bool = False):
  cls = transformers.AutoModelForSequenceClassification if seq_cls else transformers.AutoModelForCausalLM
  model = cls.from_pretrained(path, dtype=torch.float32, attn_implementation="eager")
  return model.eval()
