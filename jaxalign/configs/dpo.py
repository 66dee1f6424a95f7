"""DPO family from an SFT run: policy and frozen reference both start from model.init.

  python launch/train.py --config=configs/dpo.py --workdir=runs/dpo \
      --config.model.init=runs/sft --config.data.train=prefs.jsonl --config.loss.type=sigmoid

loss.type: sigmoid (DPO; label_smoothing > 0 = cDPO), ipo, hinge, robust, simpo, orpo (reference-free),
kto (unpaired prompt/completion/label data).
"""

import ml_collections

from jaxalign.config import base, lock, offline, parse_variant, sized


def get_config(arg: str | None = None):
  _, size = parse_variant(arg, "configs/dpo.py")
  c = offline(base("dpo"))
  c.optimizer.learning_rate = 5e-7
  c.optimizer.warmup_steps = 10
  c.optimizer.schedule = "linear"
  c.checkpoint.best_metric = "eval/rewards/accuracies"
  c.checkpoint.best_mode = "max"
  c.loss = ml_collections.ConfigDict()
  c.loss.type = "sigmoid"  # sigmoid | ipo | hinge | robust | simpo | orpo | kto.
  c.loss.beta = 0.1  # Strength of the KL constraint (IPO's tau; SimPO's beta is usually 2.0).
  c.loss.label_smoothing = 0.0  # cDPO / robust DPO / SimPO label-noise rate.
  c.loss.ipo_average = True  # IPO on per-token average log-ratios (TRL); False: summed (the paper's notation).
  c.loss.simpo_gamma = 0.5  # SimPO target margin.
  c.loss.orpo_lambda = 0.1  # ORPO odds-ratio weight.
  c.loss.desirable_weight = 1.0  # KTO.
  c.loss.undesirable_weight = 1.0  # KTO.
  c.reference = ml_collections.ConfigDict()
  c.reference.init = ""  # "" = model.init.
  c.reference.precompute = False  # One pass of reference log-probs before training; no reference held after.
  sized(c, size)
  if size == "tiny":
    c.train.steps = 30
    c.optimizer.learning_rate = 1e-4
  return lock(c)
