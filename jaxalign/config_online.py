"""Config groups shared by the online-RL stages (PPO, GRPO): rollout, reward, reference."""

from __future__ import annotations

import ml_collections


def add_online_groups(c: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  c.data.format = "prompt"  # Any records with a `prompt` field.
  c.data.dedup = False  # Repeated prompts are legitimate samples here.
  c.rollout = ml_collections.ConfigDict()
  c.rollout.batch_size = 16  # Prompts per iteration (global).
  c.rollout.prompt_len = 64  # Prompt bucket (left-padded; longer prompts keep their end).
  c.rollout.max_new_tokens = 64
  c.rollout.temperature = 1.0
  c.rollout.top_k = 0  # 0 = off.
  c.rollout.top_p = 1.0  # 1.0 = off.
  c.reward = ml_collections.ConfigDict()
  c.reward.init = ""  # Reward-model run dir or HF *ForSequenceClassification dir.
  c.reward.model_weight = 1.0  # Weight of the reward model's score in the total reward (GRPO).
  c.reward.functions = ()  # Python reward functions 'module:function' (prompts, completions) -> floats.
  c.reward.weights = ()  # One weight per function (default 1.0 each).
  c.reward.eval_functions = ()  # Extra functions reported at eval only (e.g. a gold reward).
  c.reference = ml_collections.ConfigDict()
  c.reference.init = ""  # "" = model.init.
  c.train.steps = 100  # Iterations (rollout + update).
  c.checkpoint.every = 50
  c.eval.every = 25
  c.eval.max_batches = 4  # Eval prompt batches (of rollout.batch_size).
  c.logging.every = 1
  return c
