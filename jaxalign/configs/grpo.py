"""GRPO and its relatives (RLOO, Dr. GRPO, DAPO, GSPO) from an SFT run; no value model.

  python launch/train.py --config=configs/grpo.py --workdir=runs/grpo --config.model.init=runs/sft \
      --config.data.train=prompts.jsonl --config.reward.functions="('mypkg.rewards:exact_match',)"

Variants: grpo (default), rloo, dr_grpo, dapo, gspo, tiny.
"""

import ml_collections

from jaxalign.config import base, lock, online, parse_variant, sized


def get_config(arg: str | None = None):
  variant, size = parse_variant(arg, "configs/grpo.py", ("grpo", "rloo", "dr_grpo", "dapo", "gspo"))
  c = online(base("grpo"))
  c.optimizer.learning_rate = 1e-6
  c.optimizer.schedule = "constant"
  del c.eval["batch_size"]  # In-training evals sample train.batch_size prompts at a time.
  c.grpo = ml_collections.ConfigDict()
  c.grpo.group_size = 8  # Samples per prompt (G).
  c.grpo.estimator = "grpo"  # grpo (group mean baseline) | rloo (leave-one-out).
  c.grpo.scale = "group"  # group | batch | none: divide advantages by this std.
  c.grpo.std_ddof = 1  # The std of `scale`: 1 = sample std, as TRL (torch.std); 0 = population std.
  c.grpo.std_eps = 1e-4  # Added to that std (TRL's 1e-4).
  c.grpo.loss_norm = "sequence"  # sequence (GRPO) | token | constant (Dr. GRPO) | global_token (DAPO).
  c.grpo.clip_low = 0.2
  c.grpo.clip_high = 0.2  # > clip_low: DAPO clip-higher.
  c.grpo.importance = "token"  # token | sequence (GSPO).
  c.grpo.kl_coef = 0.04  # k3 KL to the reference in the loss; 0 = no reference held.
  c.grpo.overlong_fraction = 0.0  # > 0: DAPO overlong shaping over this last fraction of the response budget.
  c.grpo.overlong_penalty = 1.0  # The shaping's full penalty, reached at the budget.
  c.grpo.dynamic_sampling = False  # DAPO: drop groups of equal rewards, sample more prompts to refill.
  c.grpo.max_rollouts = 3  # Dynamic sampling's cap on rollouts per iteration.
  c.grpo.epochs = 1
  c.grpo.minibatches = 1
  sized(c, size)  # Before the variant: a variant's defining settings (DAPO's no-KL) win over a size's.
  if variant == "rloo":
    c.grpo.estimator, c.grpo.scale, c.grpo.loss_norm = "rloo", "none", "token"
  elif variant == "dr_grpo":
    c.grpo.scale, c.grpo.loss_norm = "none", "constant"
  elif variant == "dapo":
    c.grpo.clip_high, c.grpo.loss_norm, c.grpo.kl_coef = 0.28, "global_token", 0.0
    c.grpo.overlong_fraction = 0.2  # The paper's 4,096 of 20,480 tokens.
    c.grpo.dynamic_sampling = True
  elif variant == "gspo":
    c.grpo.importance, c.grpo.clip_low, c.grpo.clip_high = "sequence", 3e-4, 4e-4
  if size == "tiny":
    c.train.batch_size = 8
    c.grpo.group_size = 4
  return lock(c)
