"""PPO (RLHF) from an SFT run and a reward-model run.

  python launch/train.py --config=configs/ppo.py --workdir=runs/ppo \
      --config.model.init=runs/sft --config.reward.init=runs/rm --config.data.train=prompts.jsonl
"""

import ml_collections

from jaxalign.config import base, lock
from jaxalign.config_online import add_online_groups


def get_config(arg: str | None = None):
  c = add_online_groups(base("ppo"))
  c.optimizer.learning_rate = 1e-6
  c.optimizer.schedule = "constant"
  c.ppo = ml_collections.ConfigDict()
  c.ppo.epochs = 2  # Passes over each rollout batch.
  c.ppo.minibatches = 2  # Minibatches per pass (one optimizer step each).
  c.ppo.clip = 0.2  # Policy ratio clip.
  c.ppo.vf_clip = 0.2  # Value clip.
  c.ppo.gamma = 1.0
  c.ppo.lam = 0.95
  c.ppo.kl_coef = 0.05  # Initial per-token KL penalty.
  c.ppo.kl_estimator = "k1"  # k1 | k2 | k3 (per-token penalty estimator).
  c.ppo.target_kl = 6.0  # Adaptive controller target (sequence KL, nats); 0 = fixed kl_coef.
  c.ppo.kl_horizon = 10000  # Controller horizon (samples).
  c.ppo.whiten_advantages = True
  c.ppo.missing_eos_penalty = 1.0  # Subtracted from the score of responses that never end.
  c.ppo.length_penalty = 0.0  # Per response token.
  c.value = ml_collections.ConfigDict()
  c.value.init = ""  # "" = reward.init (its decoder, with a fresh head).
  c.value.learning_rate = 0.0  # 0 = optimizer.learning_rate.
  if arg == "tiny":
    c.train.steps = 20
    c.rollout.batch_size = 16
    c.rollout.prompt_len = 8
    c.rollout.max_new_tokens = 24
    c.optimizer.learning_rate = 1e-4
    c.value.learning_rate = 1e-3
    c.eval.every = 10
    c.checkpoint.every = 10
  elif arg:
    raise ValueError(f"configs/ppo.py: unknown variant {arg!r} (known: tiny)")
  return lock(c)
