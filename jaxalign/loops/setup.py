"""What every stage does before its loop: mesh, tokenizer, and models from a HF dir, an earlier run, or scratch."""

from __future__ import annotations

import logging
import os

import jax

from jaxalign import checkpoint, sharding
from jaxalign.data import tokenize
from jaxalign.models import build, heads, hf, lora, transformer
from jaxalign.models.config import ModelConfig, preset


def model_overrides(model_cfg) -> dict:
  return dict(dtype=model_cfg.dtype, param_dtype=model_cfg.param_dtype, remat=model_cfg.remat,
              scan_layers=model_cfg.scan_layers, attention=model_cfg.attention, lora_rank=model_cfg.lora_rank,
              lora_alpha=model_cfg.lora_alpha, lora_targets=tuple(model_cfg.lora_targets))


def tokenizer_path(init: str, explicit: str = "") -> str:
  if explicit:
    return explicit
  if checkpoint.is_run_dir(init):
    return checkpoint.read_run_info(init).get("tokenizer", os.path.join(init, "tokenizer"))
  return init


def load_tokenizer(config):
  """The tokenizer named by model.tokenizer, or saved with model.init; chat template per data.chat_template."""
  import transformers

  path = tokenizer_path(config.model.init, config.model.tokenizer)
  if not path:
    raise ValueError("model.tokenizer is empty and model.init is empty: a from-scratch model still needs a "
                     "tokenizer directory (model.tokenizer)")
  try:
    tok = transformers.AutoTokenizer.from_pretrained(path)
  except Exception as e:
    raise ValueError(f"model.tokenizer={path}: could not load a Hugging Face tokenizer: {e}") from e
  tokenize.set_chat_template(tok, config.data.chat_template)
  if tok.pad_token_id is None:
    tok.pad_token = tok.eos_token
  return tok, path


def check_vocab(model_cfg: ModelConfig, tokenizer, where: str):
  if len(tokenizer) > model_cfg.vocab_size:
    raise ValueError(f"{where}: tokenizer has {len(tokenizer)} tokens but the model's vocab_size is "
                     f"{model_cfg.vocab_size}; use the model's own tokenizer (model.tokenizer)")


def resolve_model_config(init: str, model_group, tokenizer=None) -> ModelConfig:
  ov = model_overrides(model_group)
  if checkpoint.is_run_dir(init):
    return checkpoint.model_config_from_dict(checkpoint.read_run_info(init)["model_config"]).replace(**ov)
  if init:
    return hf.config_from_hf(init, **ov)
  vocab = len(tokenizer) if tokenizer is not None else None
  extra = {"vocab_size": _round_up(vocab, 64)} if vocab else {}
  if tokenizer is not None:
    extra.update(bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                 pad_token_id=tokenizer.pad_token_id)
  return preset(model_group.preset, **extra, **ov)


def _round_up(x: int, m: int) -> int:
  return -(-x // m) * m


def load_model(init: str, cfg: ModelConfig, mesh, rng, *, with_head: bool = False, key: str = "model.init"):
  """Params {'model': ..., ['head': ...]} placed with their shardings, and where they came from."""
  base_cfg = cfg.replace(lora_rank=0)
  shard = build.param_shardings(base_cfg, mesh)
  if checkpoint.is_run_dir(init):
    info = checkpoint.read_run_info(init)
    saved_cfg = checkpoint.model_config_from_dict(info["model_config"])
    src_cfg = base_cfg.replace(lora_rank=saved_cfg.lora_rank, lora_alpha=saved_cfg.lora_alpha,
                               lora_targets=saved_cfg.lora_targets)
    want = {"model": checkpoint.abstract_like(transformer.abstract_params(src_cfg)[0],
                                              build.param_shardings(src_cfg, mesh))}
    has_head = info.get("has_head", False)
    if with_head and has_head:
      want["head"] = checkpoint.abstract_like(heads.head_shapes(cfg), build.head_shardings(cfg, mesh))
    params, step = checkpoint.restore_params_from_run(init, want)
    if src_cfg.lora_rank:  # An adapted run: fold its adapters in; this stage starts from the merged model.
      params["model"] = jax.jit(lambda p: lora.merge(src_cfg, p), out_shardings=shard)(params["model"])
    source = {"path": os.path.abspath(init), "step": step, "kind": "jaxalign", "stage": info.get("stage")}
  elif init:
    params = {"model": build.load_hf_sharded(init, base_cfg, mesh)}
    source = {"path": os.path.abspath(init), "step": None, "kind": "huggingface"}
    if with_head:
      head = hf.load_score_head(init, cfg, build.head_shardings(cfg, mesh))
      if head is not None:  # An HF reward model (*ForSequenceClassification).
        params["head"] = head
  else:
    params = {"model": build.init_sharded(base_cfg, mesh, rng)}
    source = {"path": None, "step": None, "kind": "scratch", "seed_key": [int(x) for x in jax.device_get(rng)]}
  if cfg.lora_rank:
    params["model"] = build.add_adapters(cfg, params["model"], mesh, jax.random.fold_in(rng, 7))
  if with_head and "head" not in params:
    params["head"] = build.init_head_sharded(cfg, mesh, jax.random.fold_in(rng, 1))
  logging.info("%s: %s model (%s, %.2fM params) from %s", key, cfg.family, cfg.dtype, cfg.num_params() / 1e6,
               source["path"] or "scratch")
  return params, source


def make_mesh(config):
  mesh = sharding.mesh_from_config(config.mesh)
  dp = sharding.data_parallel_size(mesh)
  if config.train.batch_size % dp:
    raise ValueError(f"train.batch_size={config.train.batch_size} is not divisible by the data-parallel size "
                     f"mesh.data x mesh.fsdp = {dp}")
  if (config.train.batch_size // dp) % max(1, config.train.grad_accum) and config.train.batch_size % config.train.grad_accum:
    raise ValueError(f"train.batch_size={config.train.batch_size} is not divisible by train.grad_accum="
                     f"{config.train.grad_accum}")
  if config.eval.batch_size % dp:
    raise ValueError(f"eval.batch_size={config.eval.batch_size} is not divisible by the data-parallel size {dp}")
  logging.info("%s", sharding.describe(mesh))
  return mesh
