"""Supervised fine-tuning.

  python launch/train.py --config=configs/sft.py --workdir=runs/sft \
      --config.model.init=/path/to/hf_model --config.data.train=data.jsonl

Variants: `configs/sft.py:tiny` (a few CPU-minutes smoke run).
"""

from jaxalign.config import base, lock, offline, parse_variant, sized


def get_config(arg: str | None = None):
  _, size = parse_variant(arg, "configs/sft.py")
  c = offline(base("sft"))
  c.optimizer.learning_rate = 2e-5
  c.optimizer.warmup_steps = 10
  c.checkpoint.best_metric = "eval/loss"
  sized(c, size)
  return lock(c)
