"""What every stage's `build` shares: mesh, tokenizer, models from a HF dir, an earlier run or scratch (or
their shapes only, for a compile plan), frozen models, the run record and the HF export."""

from __future__ import annotations

import functools
import os
import logging
import time

import jax
import jax.numpy as jnp
import optax
from jax.sharding import NamedSharding

from jaxalign import checkpoint, paths, sharding
from jaxalign.data import examples
from jaxalign.errors import ConfigError, UserError
from jaxalign.models import build, heads, hf, lora, transformer
from jaxalign.models.config import ModelConfig, preset
from jaxalign.optim import make_optimizer
from jaxalign.steps.state import TrainState, create


def model_overrides(model_cfg) -> dict:
  """The model.* keys that override a checkpoint's architecture config."""
  out = dict(dtype=model_cfg.dtype, param_dtype=model_cfg.param_dtype, remat=model_cfg.remat,
             scan_layers=model_cfg.scan_layers, attention=model_cfg.attention, lora_rank=model_cfg.lora_rank,
             lora_alpha=model_cfg.lora_alpha, lora_targets=tuple(model_cfg.lora_targets),
             vocab_tiles=model_cfg.get("vocab_tiles", 0),
             fused_head=bool(model_cfg.get("fused_head", True)), moe_impl=model_cfg.get("moe_impl", "auto"))
  if model_cfg.get("router_aux_coef", -1.0) >= 0:  # Negative: keep the checkpoint's own coefficient.
    out["router_aux_coef"] = float(model_cfg.router_aux_coef)
  return out


def tokenizer_path(init: str, explicit: str = "") -> str:
  if explicit:
    return explicit
  if checkpoint.is_run_dir(init):
    return checkpoint.read_run_info(init).get("tokenizer", paths.join(init, "tokenizer"))
  return init


def load_tokenizer(config):
  """The tokenizer named by model.tokenizer, or saved with model.init; chat template per data.chat_template."""
  import transformers

  path = tokenizer_path(config.model.init, config.model.tokenizer)
  if not path:
    raise ConfigError("model.tokenizer is empty and model.init is empty: a from-scratch model still needs a "
                     "tokenizer directory (model.tokenizer)")
  key = "model.tokenizer" if config.model.tokenizer else "model.init"  # The key the path came from.
  try:
    tok = transformers.AutoTokenizer.from_pretrained(paths.local_copy(path, skip_weights=True))
  except Exception as e:
    reason = str(e).splitlines()[0] if str(e) else type(e).__name__
    raise ConfigError(f"{key}={path}: could not load a Hugging Face tokenizer from it ({reason}); "
                      "point model.tokenizer at a directory holding tokenizer files") from e
  examples.set_chat_template(tok, config.data.chat_template)
  if tok.pad_token_id is None:
    tok.pad_token = tok.eos_token
  return tok, path


def check_vocab(model_cfg: ModelConfig, tokenizer, where: str):
  if len(tokenizer) > model_cfg.vocab_size:
    raise ConfigError(f"{where}: tokenizer has {len(tokenizer)} tokens but the model's vocab_size is "
                     f"{model_cfg.vocab_size}; use the model's own tokenizer (model.tokenizer)")


def resolve_model_config(init: str, model_group, tokenizer=None) -> ModelConfig:
  """The architecture of model.init (run dir, HF dir) or of model.preset, with the model.* overrides.

  `model.plan_layers` exists only in the compile plan's copies of a config: the model cut to that many
  unrolled layers (XLA's cost model counts a scanned layer body once; the plan extrapolates from 1 and 2);
  `model.plan_layer_types` likewise cuts it to the listed layer kinds (models that mix sliding and global
  layers)."""
  try:
    cfg = _resolve_model_config(init, model_group, tokenizer)
  except UserError:
    raise
  except ValueError as e:  # ModelConfig's checks: "<field>=<value>: <what is expected>".
    field = str(e).split("=", 1)[0]
    raise ConfigError(f"model.{e}" if field in model_group else f"{init or 'model.preset'}: {e}") from e
  kinds = model_group.get("plan_layer_types")  # Comma-separated: the cut model's layers by kind.
  n = model_group.get("plan_layers")
  if kinds:
    types = tuple(kinds.split(","))
    cfg = cfg.replace(num_layers=len(types), scan_layers=False, layer_types=types)
  elif n:
    cfg = cfg.replace(num_layers=int(n), scan_layers=False,
                      layer_types=tuple(cfg.layer_types[:int(n)]) if cfg.layer_types else None)
  return cfg


def _resolve_model_config(init: str, model_group, tokenizer=None) -> ModelConfig:
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


def abstract_model(cfg: ModelConfig, mesh, *, with_head: bool = False) -> dict:
  """The params `load_model` would return, as ShapeDtypeStructs with their shardings (nothing read)."""
  base_cfg = cfg.replace(lora_rank=0)
  params = {"model": checkpoint.abstract_like(transformer.abstract_params(base_cfg)[0],
                                              build.param_shardings(base_cfg, mesh))}
  if cfg.lora_rank:
    params["model"] = concrete(jax.eval_shape(lambda p: build.add_adapters(cfg, p, mesh, jax.random.PRNGKey(0)),
                                              params["model"]), mesh)
  if with_head:
    params["head"] = checkpoint.abstract_like(heads.head_shapes(cfg), build.head_shardings(cfg, mesh))
  return params


def concrete(tree, mesh):
  """ShapeDtypeStructs from `jax.eval_shape` with their shardings on `mesh` (replicated where none)."""
  def fix(x):
    s = getattr(x, "sharding", None)
    spec = s.spec if isinstance(s, NamedSharding) else jax.sharding.PartitionSpec()
    return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=NamedSharding(mesh, spec))
  return jax.tree.map(fix, tree)


def load_model(init: str, cfg: ModelConfig, mesh, rng, *, with_head: bool = False, key: str = "model.init",
               abstract: bool = False):
  """Params {'model': ..., ['head': ...]} placed with their shardings, and where they came from.
  `abstract`: their shapes and shardings only, nothing read (the compile plan)."""
  if abstract:
    return abstract_model(cfg, mesh, with_head=with_head), {"path": init or None, "kind": "abstract"}
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
    source = {"path": paths.resolve(init), "step": step, "kind": "jaxalign", "stage": info.get("stage"),
              "checkpoint": checkpoint.chosen_step(init, [step])[1]}  # "best <metric>=<v>" or "latest".
  elif init:
    params = {"model": build.load_hf_sharded(init, base_cfg, mesh)}
    source = {"path": paths.resolve(init), "step": None, "kind": "huggingface"}
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
    raise ConfigError(f"train.batch_size={config.train.batch_size} is not divisible by the data-parallel size "
                     f"mesh.data x mesh.fsdp = {dp}")
  accum = config.train.get("grad_accum", 1)  # Offline stages only.
  if (config.train.batch_size // dp) % max(1, accum) and config.train.batch_size % accum:
    raise ConfigError(f"train.batch_size={config.train.batch_size} is not divisible by train.grad_accum={accum}")
  eval_rows = config.eval.get("batch_size", config.train.batch_size)
  if eval_rows % dp:
    raise ConfigError(f"eval.batch_size={eval_rows} is not divisible by the data-parallel size {dp}")
  logging.info("%s", sharding.describe(mesh))
  return mesh


# ----------------------------------------------------------------------------------------------- what builds share

INPUT_KEYS = ("model.init", "model.tokenizer", "data.train", "data.eval", "reference.init", "reward.init",
              "value.init", "compare.init")


def check_inputs(config):
  """Every configured input path exists and is readable, before anything loads or compiles: one PathError
  naming the key and the path otherwise. Bucket paths (gs://, s3://) and local paths are checked; a bare
  `name` or `org/name` that is not a local path may be a Hugging Face hub id, left to its loader."""
  for key in INPUT_KEYS:
    group, name = key.split(".")
    value = config[group].get(name, "") if group in config else ""
    if value and (paths.is_remote(value) or _local_looking(value)):
      paths.check(value, key)


def _local_looking(value: str) -> bool:
  """A path that cannot be a hub id: absolute, ./ or ../, two or more slashes, or a data file suffix."""
  v = str(value)
  return (v.startswith(("/", "./", "../")) or v.count("/") >= 2 or os.path.exists(v)
          or v.endswith((".jsonl", ".json", ".parquet", ".arrow", ".csv")))


def prepare(config, workdir: str, *, with_head: bool = False, mesh=None, abstract: bool = False):
  """Mesh, tokenizer, model config and params for a stage; saves the tokenizer into the workdir.

  `abstract` (the compile plan): params are shapes with shardings; the tokenizer is optional (an HF
  directory may hold only config.json) and nothing is written."""
  mesh = make_mesh(config) if mesh is None else mesh
  if not abstract:
    check_inputs(config)
  if abstract:
    try:
      tok, _ = load_tokenizer(config)
    except ValueError:
      tok = None
  else:
    tok, _ = load_tokenizer(config)
  model_cfg = resolve_model_config(config.model.init, config.model, tok)
  if tok is not None:
    check_vocab(model_cfg, tok, "model.tokenizer")
  rng = jax.random.PRNGKey(config.seed)
  params, source = load_model(config.model.init, model_cfg, mesh, rng, with_head=with_head, abstract=abstract)
  if not abstract and jax.process_index() == 0:
    paths.makedirs(workdir)
    with paths.writable_dir(paths.join(workdir, "tokenizer")) as d:
      tok.save_pretrained(d)
  return mesh, tok, model_cfg, params, source


def new_state(params, tx, seed: int, mesh, *, frozen=None, abstract: bool = False) -> TrainState:
  """A fresh TrainState created on the params' devices (or its shapes and shardings, `abstract`)."""
  if abstract:
    return abstract_state(params, abstract_opt_state(tx, params, mesh), mesh, frozen=frozen)
  return jax.jit(functools.partial(create, tx=tx, seed=seed))(params)._replace(frozen=frozen)


def abstract_state(params, opt_state, mesh, *, frozen=None, extra=None) -> TrainState:
  """A TrainState of ShapeDtypeStructs (the compile plan's), its counters and key replicated."""
  rep = sharding.replicated(mesh)
  scalar = lambda dt: jax.ShapeDtypeStruct((), dt, sharding=rep)  # noqa: E731
  return TrainState(scalar(jnp.int32), params, opt_state, jax.ShapeDtypeStruct((2,), jnp.uint32, sharding=rep),
                    scalar(jnp.int32), scalar(jnp.float32), frozen, extra)


def abstract_opt_state(tx, params, mesh):
  """`tx.init(params)` as ShapeDtypeStructs: moments sharded like the params they mirror, counts replicated."""
  shapes = jax.eval_shape(tx.init, params)
  rep = sharding.replicated(mesh)
  param_sh = jax.tree.map(lambda x: x.sharding, params)
  try:
    shs = optax.tree_map_params(tx, lambda p, s: s, shapes, param_sh, transform_non_params=lambda x: rep)
  except Exception:  # A state optax cannot map onto the params: match by path suffix and shape instead.
    flat = {tuple(sharding.path_name(p).split("/")): (x.shape, x.sharding)
            for p, x in jax.tree_util.tree_flatten_with_path(params)[0]}

    def match(path, x):
      keys = tuple(sharding.path_name(path).split("/"))
      for n in range(len(keys)):
        hit = flat.get(keys[n:])
        if hit is not None and hit[0] == x.shape:
          return hit[1]
      return rep
    shs = jax.tree_util.tree_map_with_path(match, shapes)
  return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), shapes, shs)


def optimizer(config, params, updates: int, ocfg=None):
  """(tx, schedule) for `updates` optimizer steps over the whole run."""
  return make_optimizer(config.optimizer if ocfg is None else ocfg, params, updates)


def load_frozen(config, model_cfg, mesh, *, reference: bool, reward: bool, abstract: bool = False):
  """Frozen models ({'reference': model params, 'reward': {'model', 'head'}}) and where they came from.

  The reference is reference.init (default model.init) with the policy's architecture; the reward model
  is reward.init and must share the policy's tokenizer and architecture. A plan (`abstract`) without them
  takes the policy's shapes."""
  frozen, sources = {}, {}
  base_cfg = model_cfg.replace(lora_rank=0)
  if reference and abstract and not (config.reference.init or config.model.init):  # A plan from a preset.
    frozen["reference"], sources["reference"] = abstract_model(base_cfg, mesh)["model"], {"kind": "abstract"}
  elif reference:
    init = config.reference.init or config.model.init
    if not init:
      raise ConfigError(f"{config.stage} needs a reference: set model.init to an SFT run or HF checkpoint (or "
                       "reference.init)")
    ref_cfg = resolve_model_config(init, config.model).replace(lora_rank=0)
    if ref_cfg != base_cfg:
      raise ConfigError(f"reference.init={init}: architecture differs from the policy's ({model_cfg.family}, "
                       f"{model_cfg.num_layers} layers, hidden {model_cfg.hidden_size}); the reference must be the "
                       "same model")
    p, sources["reference"] = load_model(init, base_cfg, mesh, jax.random.PRNGKey(0), key="reference.init",
                                         abstract=abstract)
    frozen["reference"] = p["model"]
  if reward and abstract and not config.reward.init:
    frozen["reward"], sources["reward"] = abstract_model(base_cfg, mesh, with_head=True), {"kind": "abstract"}
  elif reward:
    rm_cfg = resolve_model_config(config.reward.init, config.model)
    if (rm_cfg.vocab_size, rm_cfg.hidden_size, rm_cfg.num_layers) != (model_cfg.vocab_size, model_cfg.hidden_size,
                                                                        model_cfg.num_layers):
      raise ConfigError(f"reward.init={config.reward.init}: its architecture (vocab {rm_cfg.vocab_size}, hidden "
                       f"{rm_cfg.hidden_size}, {rm_cfg.num_layers} layers) does not match the policy's; the reward "
                       "model must share the policy's tokenizer and, in this version, its architecture")
    frozen["reward"], sources["reward"] = load_model(config.reward.init, base_cfg, mesh, jax.random.PRNGKey(0),
                                                     with_head=True, key="reward.init", abstract=abstract)
  return hold_in_compute_dtype(frozen, model_cfg.dtype), sources


def hold_in_compute_dtype(frozen: dict, dtype):
  """Frozen models' weight matrices held in the matmul dtype (bf16 on accelerators): half the memory, and
  nothing lost, since every matrix is cast to that dtype at use anyway (on TPU/GPU the same bits; XLA:CPU
  may skip that rounding for f32 weights); vectors (norm scales, biases, the reward head) keep their dtype,
  as norms compute in float32."""
  dt = jnp.dtype(dtype)

  def hold(path, x):
    keep = x.ndim < 2 or "head" in sharding.path_name(path).split("/") or x.dtype == dt
    if keep:
      return x
    if isinstance(x, jax.ShapeDtypeStruct):
      return jax.ShapeDtypeStruct(x.shape, dt, sharding=x.sharding)
    return x.astype(dt)

  abstract = any(isinstance(x, jax.ShapeDtypeStruct) for x in jax.tree.leaves(frozen))
  if abstract:
    return jax.tree_util.tree_map_with_path(hold, frozen)
  shardings = jax.tree.map(lambda x: x.sharding, frozen)
  return jax.jit(lambda f: jax.tree_util.tree_map_with_path(hold, f), out_shardings=shardings)(frozen)


def record_run(workdir: str, config, model_cfg, sources: dict, has_head: bool = False):
  """WORKDIR/run.json: the stage, model config, tokenizer and where each model came from."""
  checkpoint.write_run_info(workdir, {
      "stage": config.stage, "model_config": checkpoint.model_config_dict(model_cfg),
      "tokenizer": paths.resolve(paths.join(workdir, "tokenizer")), "has_head": has_head,
      "sources": sources, "config": config.to_dict(), "created": time.strftime("%Y-%m-%d %H:%M:%S")})


def write_reports(workdir: str, reports):
  """WORKDIR/data_report.json (the data reports are logged once, where they are made)."""
  if jax.process_index() == 0:
    paths.write_json(paths.join(workdir, "data_report.json"), [r.summary() for r in reports])


def export_hf(workdir: str, model_cfg, params, tok, head=None, dtype=None) -> str:
  """WORKDIR/export/hf as a transformers checkpoint; LoRA adapters are merged into the weights."""
  out = paths.join(workdir, "export", "hf")
  if model_cfg.lora_rank:
    params = jax.jit(lora.merge, static_argnums=0)(model_cfg, params)
    model_cfg = model_cfg.replace(lora_rank=0)
  hf.save_params(out, model_cfg, params, head=head, dtype=dtype, tokenizer=tok)
  logging.info("exported a Hugging Face checkpoint to %s", out)
  return out


def batch_spec(mesh, shapes: dict) -> dict:
  """Abstract batch {name: (shape, dtype)} -> ShapeDtypeStructs sharded over (data, fsdp)."""
  return {k: jax.ShapeDtypeStruct(s, dt, sharding=sharding.batch_sharding(mesh, len(s))) for k, (s, dt) in shapes.items()}


def batch_evaluator(eval_fn, metrics_fn, eval_batches, state_sh, mesh):
  """`evaluate(state, step, final)` over fixed eval batches: per-batch sums accumulate inside jit (no eager op
  on global arrays: multi-process safe), then `metrics_fn(sums)` on the host."""
  if not eval_batches or eval_fn is None:
    return None
  from jaxalign.loops.driver import to_device
  from jaxalign.metrics import fetch
  rep = sharding.replicated(mesh)
  bs = sharding.batch_sharding(mesh)
  first = jax.jit(eval_fn, in_shardings=(state_sh, bs), out_shardings=rep)
  more = jax.jit(lambda st, b, acc: jax.tree.map(jnp.add, acc, eval_fn(st, b)),
                 in_shardings=(state_sh, bs, rep), out_shardings=rep, donate_argnums=(2,))

  def evaluate(state, step, final):
    del step, final
    sums = None
    for b in eval_batches:
      sums = first(state, to_device(b, mesh)) if sums is None else more(state, to_device(b, mesh), sums)
    return {k: float(v) for k, v in metrics_fn(fetch(sums)).items()}

  return evaluate
