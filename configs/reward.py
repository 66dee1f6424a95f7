"""Reward model (Bradley-Terry) from an SFT run.

  python launch/train.py --config=configs/reward.py --workdir=runs/rm \
      --config.model.init=runs/sft --config.data.train=prefs.jsonl

Data: prompt/chosen/rejected (plain or conversational, prompt optional), optional margin; or ranked/rated
responses (prompt, responses, ranking|ratings) expanded into all pairs.
"""

import ml_collections

from jaxalign.config import base, lock


def get_config(arg: str | None = None):
  c = base("reward")
  c.optimizer.learning_rate = 1e-5
  c.optimizer.warmup_steps = 10
  c.checkpoint.best_metric = "eval/accuracy"
  c.checkpoint.best_mode = "max"
  c.reward = ml_collections.ConfigDict()
  c.reward.center_coef = 0.0  # Adds coef * (r_c + r_r)^2 (keeps rewards centred; 0.01 is usual).
  c.reward.use_margin = True  # Subtract the per-pair `margin` field when present.
  if arg == "tiny":
    c.train.steps = 30
    c.train.seq_len = 64
    c.optimizer.learning_rate = 1e-3
    c.eval.every = 10
    c.checkpoint.every = 10
  elif arg:
    raise ValueError(f"configs/reward.py: unknown variant {arg!r} (known: tiny)")
  return lock(c)
