"""The config keys every stage shares (../DESIGN 'Contracts'), so any stage is driven the same way, plus the
offline and online groups and the one variant parser.

Stage files in `configs/` call `base(stage)`, add `offline(c)` (SFT, reward, DPO: token batches from records)
or `online(c)` (PPO, GRPO, evaluate: prompts and sampling) and their own group, and return `lock(config)`: a
locked ConfigDict holding only keys the stage reads, so an override of any other key is an error naming it.
"""

from __future__ import annotations

import ml_collections

from jaxalign.errors import ConfigError


def base(stage: str) -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.stage = stage  # Which train loop launch/train.py runs.
  c.seed = 0  # Params init, data order, sampling.

  c.model = ml_collections.ConfigDict()
  c.model.init = ""  # HF checkpoint dir, or an earlier run's workdir (its latest checkpoint); "" = from scratch.
  c.model.preset = "tiny"  # Architecture when training from scratch (jaxalign.models.config.preset).
  c.model.tokenizer = ""  # HF tokenizer dir; "" = the one saved with model.init.
  c.model.dtype = "float32"  # Matmul dtype (bfloat16 on accelerators).
  c.model.param_dtype = "float32"  # Storage dtype of params and optimizer state.
  c.model.remat = "none"  # none | full | dots | offload (weight matmul outputs to host memory; TPU/GPU).
  c.model.scan_layers = True  # lax.scan over layers (compile time independent of depth).
  c.model.attention = "auto"  # auto (splash on TPU, fused elsewhere) | fused | dense | splash.
  c.model.vocab_tiles = 0  # LM head log-probs over this many vocabulary tiles (0 = auto: 1 up to 32k tokens).
  c.model.fused_head = True  # SFT with a tiled head: gradients made in the forward (3 head matmuls, not 4; +[D, V] bytes).
  c.model.moe_impl = "auto"  # MoE grouped matmul: auto (megablox on TPU, ragged_dot on GPU, tiled on CPU) | ...
  c.model.router_aux_coef = -1.0  # MoE load-balancing loss weight; < 0 = the checkpoint's router_aux_loss_coef.
  c.model.lora_rank = 0  # > 0: train low-rank adapters only; the reference is the base with adapters off.
  c.model.lora_alpha = 16.0
  c.model.lora_targets = ("wq", "wk", "wv", "wo")  # Any of wq wk wv wo w_gate w_up w_down.

  c.data = ml_collections.ConfigDict()
  c.data.train = ""  # Local JSONL/JSON/parquet/arrow/CSV file, a directory, or a hub dataset name.
  c.data.eval = ""  # Same; "" = hold out data.eval_fraction of train.
  c.data.eval_fraction = 0.05  # Held-out fraction when data.eval is empty.
  c.data.split = "train"  # Split name for hub datasets / dataset dicts.
  c.data.format = "auto"  # auto | text | prompt_completion | messages | preference | prompt.
  c.data.chat_template = ""  # "" = the tokenizer's; or a named default ("chatml") / a Jinja string.
  c.data.bad_rows = "error"  # error | skip (counted in the data report).
  c.data.dedup = True  # Drop exact duplicate records.
  c.data.max_records = 0  # Use at most this many records (0 = all).

  c.train = ml_collections.ConfigDict()
  c.train.steps = 100  # Optimizer steps.
  c.train.batch_size = 8  # Global batch: rows (offline) or prompts per iteration (online); over the data axes.
  c.train.seq_len = 256  # Longest row: tokens (offline); prompt + response (online).
  c.train.run_steps = 0  # Stop this invocation after N steps (rerun to continue; for job time limits). 0 = off.
  c.train.nan_policy = "stop"  # stop | skip: non-finite loss or gradient.
  c.train.loss_spike = 0.0  # Skip an update whose loss exceeds this multiple of the running mean (0 = off).

  c.optimizer = ml_collections.ConfigDict()
  c.optimizer.name = "adamw"  # adamw | sgd | adafactor.
  c.optimizer.learning_rate = 1e-4
  c.optimizer.schedule = "cosine"  # constant | linear | cosine (after warmup).
  c.optimizer.warmup_steps = 0
  c.optimizer.end_lr_fraction = 0.1  # Final lr as a fraction of the peak (linear/cosine).
  c.optimizer.weight_decay = 0.0  # Decoupled; never applied to norms and biases.
  c.optimizer.b1 = 0.9
  c.optimizer.b2 = 0.999
  c.optimizer.eps = 1e-8
  c.optimizer.clip_norm = 1.0  # Global-norm clipping (0 = off).
  c.optimizer.freeze = ()  # Frozen params: "embed", "lm_head", "layers:0-3" (lower layers), "head".

  c.mesh = ml_collections.ConfigDict()
  c.mesh.data = 1
  c.mesh.fsdp = -1  # -1 = the remaining devices.
  c.mesh.expert = 1  # Expert parallelism (Mixture-of-Experts models): experts and the batch split over it.
  c.mesh.tensor = 1

  c.checkpoint = ml_collections.ConfigDict()
  c.checkpoint.every = 100  # Steps between checkpoints (and one at the end).
  c.checkpoint.keep = 3  # Most recent checkpoints kept (the best one too when best_metric is set).
  c.checkpoint.best_metric = ""  # e.g. "eval/loss": keep the best by this eval metric.
  c.checkpoint.best_mode = "min"  # min | max.
  c.checkpoint.early_stop = 0  # Stop after this many evals without improving best_metric (0 = off).
  c.checkpoint.async_save = True  # Save in the background while training continues.

  c.eval = ml_collections.ConfigDict()
  c.eval.every = 50  # Steps between evals (0 = only at the end).
  c.eval.batch_size = 8  # Global rows per eval batch.
  c.eval.max_batches = 0  # 0 = the whole eval set.

  c.logging = ml_collections.ConfigDict()
  c.logging.every = 10  # Steps between metric lines.
  c.logging.tensorboard = True
  c.logging.progress = True  # tqdm progress bar.
  c.logging.report = True  # WORKDIR/report.md + curves.png when the run finishes (jaxalign.report).

  c.export = ml_collections.ConfigDict()
  c.export.hf = True  # Write WORKDIR/export/hf at the end (a transformers checkpoint + tokenizer).
  c.export.dtype = ""  # "" = param_dtype.
  return c


def offline(c: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """Keys of the stages that train on token batches made from records (SFT, reward, DPO)."""
  c.data.completion_only = True  # Loss only on completion / assistant tokens.
  c.data.add_eos = True  # Append EOS to completions (plain formats).
  c.data.pack = True  # Pack examples into full rows (segment ids keep them apart); else pad.
  c.data.buckets = ()  # Extra shorter row lengths for padded batches, e.g. (128, 256).
  c.data.loss_window = 4  # SFT (padded) and DPO rows: logits from the first trained column on, in 1/N-row steps (0 = off).
  c.data.max_prompt_len = 0  # Pairs: prompt tokens kept (its end) when a pair is too long; 0 = seq_len // 2.
  c.data.too_long = "truncate"  # truncate | drop | error, for examples longer than train.seq_len.
  c.train.grad_accum = 1  # Microbatches per step (a scan inside the step).
  return c


def online(c: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """Keys of the stages that sample (PPO, GRPO, evaluate): prompts, the sampler, reward sources, reference.

  train.batch_size is the number of prompts per iteration and train.seq_len the longest rollout row: the
  prompt (rollout.prompt_len, left-padded) plus up to train.seq_len - rollout.prompt_len response tokens."""
  c.data.format = "prompt"  # Any records with a `prompt` field.
  c.data.dedup = False  # Repeated prompts are legitimate samples here.
  del c.train["loss_spike"]  # A policy-gradient loss has no scale to spike against; nan_policy still applies.
  c.train.batch_size = 16
  c.train.seq_len = 128
  c.rollout = ml_collections.ConfigDict()
  c.rollout.prompt_len = 64  # Prompt bucket (left-padded; longer prompts keep their end).
  c.rollout.temperature = 1.0
  c.rollout.top_k = 0  # 0 = off.
  c.rollout.top_p = 1.0  # 1.0 = off.
  c.reward = ml_collections.ConfigDict()
  c.reward.init = ""  # Reward-model run dir or HF *ForSequenceClassification dir.
  c.reward.model_weight = 1.0  # Weight of the reward model's score in the total reward (GRPO).
  c.reward.functions = ()  # 'module:function': fn(prompts, completions, **columns) -> floats (None: n/a).
  c.reward.weights = ()  # One weight per function (default 1.0 each).
  c.reward.eval_functions = ()  # Extra functions reported at eval only (e.g. a gold reward).
  c.reward.timeout_s = 300.0  # A reward function's call past this many seconds costs its batch's rewards.
  c.reference = ml_collections.ConfigDict()
  c.reference.init = ""  # "" = model.init.
  c.env = ml_collections.ConfigDict()  # Multi-turn episodes (GRPO and evaluate; jaxalign.rewards.environments).
  c.env.name = ""  # "" = single-turn; 'calculator' | 'python' | 'module:Factory'.
  c.env.max_turns = 4  # Policy turns per episode.
  c.env.turn_tokens = 64  # New tokens per policy turn (the episode's budget is train.seq_len - rollout.prompt_len).
  c.env.reward_weight = 1.0  # Weight of the environment's reward (logged as reward/env).
  c.env.observation_role = "tool"  # Chat-template role of observations (falls back to "user").
  c.train.steps = 100  # Iterations (rollout + update).
  c.checkpoint.every = 50
  c.eval.every = 25
  c.eval.max_batches = 4  # Eval prompt batches (of train.batch_size prompts).
  c.eval.samples_per_prompt = 1  # k > 1: k samples per prompt; means are mean@k, and pass@k per reward function.
  c.eval.pass_threshold = 1.0  # A sample passes when a reward function gives at least this (verifiers: 1.0).
  c.logging.every = 1
  return c


def parse_variant(arg: str | None, path: str, variants: tuple[str, ...] = ()) -> tuple[str, str]:
  """`configs/x.py:variant[,size]` -> (variant, size); size is "", "tiny" (a CPU-minutes smoke run) or
  "small" (hyperparameters for models under ~100M parameters, see `small`).
  An unknown name is an error naming the file and the known names."""
  names = [n for n in (arg or "").split(",") if n]
  variant = size = ""
  for n in names:
    if n in ("tiny", "small") and not size:
      size = n
    elif n in variants and not variant:
      variant = n
    else:
      known = ", ".join((*variants, "tiny", "small"))
      raise ConfigError(f"{path}: unknown variant {arg!r} (known: {known}; a variant and a size combine as "
                       f"'name,small')")
  return variant, size


def tiny(c: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """The `:tiny` size every stage shares: a run of a few CPU-minutes on a tiny model."""
  c.train.steps = 20
  c.eval.every = 10
  c.checkpoint.every = 10
  if "rollout" in c:
    c.train.batch_size = 16
    c.rollout.prompt_len = 8
    c.train.seq_len = 32  # 8 prompt + 24 response tokens.
    c.optimizer.learning_rate = 1e-4
  else:
    c.train.seq_len = 64
    c.optimizer.learning_rate = 1e-3
  return c


# The hyperparameters the quickstart trains its 0.9M-parameter model with (tests/test_quickstart.py checks
# each method beats SFT with them): the `:small` size, for models under ~100M parameters. The defaults of
# each stage suit billion-parameter models (DPO lr 5e-7, PPO/GRPO 1e-6), which barely move a small one.
SMALL = {
    "sft": {"optimizer.learning_rate": 2e-3, "optimizer.warmup_steps": 20, "train.batch_size": 32},
    "reward": {"optimizer.learning_rate": 3e-4, "train.batch_size": 32},
    "dpo": {"optimizer.learning_rate": 1e-4, "optimizer.warmup_steps": 10, "loss.beta": 0.1,
            "train.batch_size": 32},
    "ppo": {"optimizer.learning_rate": 5e-5, "value.learning_rate": 5e-4, "ppo.kl_coef": 0.05,
            "ppo.target_kl": 4.0, "ppo.kl_horizon": 2000, "train.batch_size": 32},
    "grpo": {"optimizer.learning_rate": 1e-4, "grpo.kl_coef": 0.2, "grpo.group_size": 4, "train.batch_size": 16},
    "evaluate": {},
}


def sized(c: ml_collections.ConfigDict, size: str) -> ml_collections.ConfigDict:
  """Apply the `:tiny` or `:small` size of a stage config (nothing for "")."""
  if size == "tiny":
    return tiny(c)
  if size == "small":
    for key, value in SMALL[c.stage].items():
      group, name = key.split(".")
      c[group][name] = value
  return c


def lock(c: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  c.lock()
  return c
