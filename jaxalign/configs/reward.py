"""Reward model (Bradley-Terry) from an SFT run.

  python launch/train.py --config=configs/reward.py --workdir=runs/rm \
      --config.model.init=runs/sft --config.data.train=prefs.jsonl

Data: prompt/chosen/rejected (plain or conversational, prompt optional), optional margin; or ranked/rated
responses (prompt, responses, ranking|ratings) expanded into all pairs.
"""

import ml_collections

from jaxalign.config import base, lock, offline, parse_variant, sized


def get_config(arg: str | None = None):
  _, size = parse_variant(arg, "configs/reward.py")
  c = offline(base("reward"))
  c.optimizer.learning_rate = 1e-5
  c.optimizer.warmup_steps = 10
  c.checkpoint.best_metric = "eval/accuracy"
  c.checkpoint.best_mode = "max"
  c.loss = ml_collections.ConfigDict()
  c.loss.center_coef = 0.0  # Adds coef * (r_c + r_r)^2 (keeps rewards centred; 0.01 is usual).
  c.loss.use_margin = True  # Subtract the per-pair `margin` field when present.
  sized(c, size)
  if size == "tiny":
    c.train.steps = 30
  return lock(c)
