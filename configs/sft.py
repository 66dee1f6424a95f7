"""Supervised fine-tuning.

  python launch/train.py --config=configs/sft.py --workdir=runs/sft \
      --config.model.init=/path/to/hf_model --config.data.train=data.jsonl

Variants: `configs/sft.py:tiny` (a few CPU-minutes smoke run).
"""

from jaxalign.config import base, lock


def get_config(arg: str | None = None):
  c = base("sft")
  c.optimizer.learning_rate = 2e-5
  c.optimizer.warmup_steps = 10
  c.checkpoint.best_metric = "eval/loss"
  if arg == "tiny":
    c.train.steps = 20
    c.train.seq_len = 64
    c.optimizer.learning_rate = 1e-3
    c.eval.every = 10
    c.checkpoint.every = 10
  elif arg:
    raise ValueError(f"configs/sft.py: unknown variant {arg!r} (known: tiny)")
  return lock(c)
