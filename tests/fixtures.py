"""Test data: a tiny trained tokenizer, a random HF Llama with its vocabulary, and JSONL datasets."""

from __future__ import annotations

import json
import os
import random

WORDS = ("the a good bad great awful movie film plot actors music story was is really very quite not "
         "loved hated enjoyed boring fun slow bright dark ending scene").split()


def sentences(n: int, seed: int = 0) -> list[str]:
  rng = random.Random(seed)
  return [" ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 12))) for _ in range(n)]


def make_tokenizer(path: str, vocab_size: int = 300):
  from jaxalign.data.tasks.tokenizer import train_tokenizer

  tok = train_tokenizer(sentences(2000, 1) + [" ".join(WORDS)], vocab_size=vocab_size)
  tok.save_pretrained(path)
  return tok


def make_llama(path: str, tok, **kw) -> str:
  import torch
  import transformers

  torch.manual_seed(0)
  cfg = transformers.LlamaConfig(vocab_size=len(tok) + (-len(tok) % 16), hidden_size=64, intermediate_size=128,
                                 num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                 max_position_embeddings=512, bos_token_id=tok.bos_token_id,
                                 eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id, **kw)
  model = transformers.LlamaForCausalLM(cfg)
  model.save_pretrained(path)
  tok.save_pretrained(path)
  return path


def make_moe(path: str, tok_dir: str) -> str:
  """A random Qwen3-MoE (8 experts, top 2, routers redrawn: HF's zero routers tie every expert) with the
  tiny tokenizer."""
  import torch
  import transformers

  tok = transformers.AutoTokenizer.from_pretrained(tok_dir)
  torch.manual_seed(0)
  cfg = transformers.Qwen3MoeConfig(vocab_size=len(tok) + (-len(tok) % 16), hidden_size=64, num_hidden_layers=2,
                                    num_attention_heads=4, num_key_value_heads=2, head_dim=16, num_experts=8,
                                    num_experts_per_tok=2, moe_intermediate_size=32, norm_topk_prob=True,
                                    max_position_embeddings=512, bos_token_id=tok.bos_token_id,
                                    eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
  model = transformers.Qwen3MoeForCausalLM(cfg)
  with torch.no_grad():
    for layer in model.model.layers:
      layer.mlp.gate.weight.normal_(0.0, 0.5)
  model.save_pretrained(path)
  tok.save_pretrained(path)
  return path


def write_jsonl(path: str, rows: list[dict]) -> str:
  with open(path, "w") as f:
    for r in rows:
      f.write(json.dumps(r) + "\n")
  return path


def messages_rows(n: int, seed: int = 0) -> list[dict]:
  """Conversations whose answers follow a learnable rule (the reply repeats the question reversed)."""
  rng = random.Random(seed)
  out = []
  for _ in range(n):
    q = [rng.choice(WORDS) for _ in range(rng.randint(2, 6))]
    out.append({"messages": [{"role": "user", "content": " ".join(q)},
                             {"role": "assistant", "content": " ".join(reversed(q))}]})
  return out


def prompt_completion_rows(n: int, seed: int = 0) -> list[dict]:
  rng = random.Random(seed)
  out = []
  for _ in range(n):
    q = [rng.choice(WORDS) for _ in range(rng.randint(2, 6))]
    out.append({"prompt": " ".join(q) + " :", "completion": " " + " ".join(reversed(q))})
  return out


def tiny_setup(root: str, n: int = 200) -> dict[str, str]:
  """A tokenizer+model dir and a messages dataset under `root`."""
  os.makedirs(root, exist_ok=True)
  tok = make_tokenizer(os.path.join(root, "tok"))
  model = make_llama(os.path.join(root, "llama"), tok)
  train = write_jsonl(os.path.join(root, "train.jsonl"), messages_rows(n, 0))
  evals = write_jsonl(os.path.join(root, "eval.jsonl"), messages_rows(max(16, n // 10), 1))
  return {"model": model, "train": train, "eval": evals, "tokenizer": os.path.join(root, "tok")}
