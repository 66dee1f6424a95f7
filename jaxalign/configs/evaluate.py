"""Evaluate a policy checkpoint: samples on held-out prompts, reward-model score, reward functions, KL to the
reference, and win rate against another checkpoint.

  python launch/train.py --config=configs/evaluate.py --workdir=runs/eval_ppo \
      --config.model.init=runs/ppo --config.reference.init=runs/sft --config.reward.init=runs/rm \
      --config.compare.init=runs/sft --config.data.eval=prompts_eval.jsonl
"""

import ml_collections

from jaxalign.config import base, lock, online, parse_variant, sized


def get_config(arg: str | None = None):
  _, size = parse_variant(arg, "configs/evaluate.py")
  c = online(base("evaluate"))
  c.eval.max_batches = 0  # 0 = every prompt.
  c.rollout.temperature = 1.0
  c.compare = ml_collections.ConfigDict()
  c.compare.init = ""  # Another policy (run dir or HF dir) to compute the win rate against.
  c.compare.judge = ""  # "" = the reward model's score; or "reward/<function name>".
  sized(c, size)
  return lock(c)
