"""PPO (RLHF) from an SFT run and a reward-model run.

  python launch/train.py --config=configs/ppo.py --workdir=runs/ppo \
      --config.model.init=runs/sft --config.reward.init=runs/rm --config.data.train=prompts.jsonl
"""

import ml_collections

from jaxalign.config import base, lock, online, parse_variant, sized


def get_config(arg: str | None = None):
  _, size = parse_variant(arg, "configs/ppo.py")
  c = online(base("ppo"))
  c.optimizer.learning_rate = 1e-6
  c.optimizer.schedule = "constant"
  del c.eval["batch_size"]  # In-training evals sample train.batch_size prompts at a time.
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
  sized(c, size)
  if size == "tiny":
    c.value.learning_rate = 1e-3
  return lock(c)
