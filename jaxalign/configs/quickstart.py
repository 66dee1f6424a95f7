"""The whole alignment pipeline on the built-in reviews task: SFT -> reward model -> DPO, PPO, GRPO -> eval.

  python launch/pipeline.py --config=configs/quickstart.py --workdir=runs/quickstart

Each stage is an ordinary `launch/train.py` run; the groups below are the `--config.*` overrides it gets.
Variants: `:test` (a smaller, faster version used by the test suite).
"""

import types

import ml_collections

GOLD = "jaxalign.data.tasks.reviews:gold_reward_fn"
FLUENT = "jaxalign.data.tasks.reviews:fluency_fn"


def _nest(flat: dict) -> ml_collections.ConfigDict:
  """{'train.steps': 5} -> ConfigDict(train=ConfigDict(steps=5)): the stage overrides, as the stage names them."""
  out: dict = {}
  for key, value in flat.items():
    node = out
    *parents, leaf = key.split(".")
    for p in parents:
      node = node.setdefault(p, {})
    node[leaf] = value
  return ml_collections.ConfigDict(out)


def get_config(arg: str | None = None):
  c = ml_collections.ConfigDict()
  c.seed = 0
  c.task = ml_collections.ConfigDict(dict(n_sft=4000, n_pref=3000, n_prompts=1000, n_eval=256))
  c.methods = ("dpo", "ppo", "grpo")  # Policies trained from the SFT checkpoint and compared.
  stages = types.SimpleNamespace()
  common = dict(seed=0, **{"logging.progress": True})
  stages.sft = dict({**common, "model.preset": "small", "train.steps": 400, "train.batch_size": 32,
                                     "train.seq_len": 64, "optimizer.learning_rate": 2e-3,
                                     "optimizer.warmup_steps": 20, "eval.every": 200, "checkpoint.every": 400})
  stages.reward = dict({**common, "train.steps": 250, "train.batch_size": 32, "train.seq_len": 64,
                                        "optimizer.learning_rate": 3e-4, "eval.every": 125,
                                        "checkpoint.every": 250})
  stages.dpo = dict({**common, "train.steps": 150, "train.batch_size": 32, "train.seq_len": 64,
                                     "optimizer.learning_rate": 1e-4, "optimizer.warmup_steps": 10,
                                     "loss.beta": 0.1, "eval.every": 75, "checkpoint.every": 150})
  online = {"train.batch_size": 32, "rollout.prompt_len": 8, "train.seq_len": 40,
            "eval.max_batches": 4, "reward.eval_functions": (GOLD, FLUENT), "logging.every": 5}
  stages.ppo = dict({**common, **online, "train.steps": 60, "optimizer.learning_rate": 5e-5,
                                     "value.learning_rate": 5e-4, "ppo.kl_coef": 0.05, "ppo.target_kl": 4.0,
                                     "ppo.kl_horizon": 2000, "eval.every": 20, "checkpoint.every": 60})
  stages.grpo = dict({**common, **online, "train.batch_size": 16, "grpo.group_size": 4,
                                      "train.steps": 60, "optimizer.learning_rate": 1e-4, "grpo.kl_coef": 0.2,
                                      "eval.every": 20, "checkpoint.every": 60})
  stages.evaluate = dict({**common, "rollout.prompt_len": 8, "train.seq_len": 40,
                                          "reward.eval_functions": (GOLD, FLUENT), "eval.batch_size": 32,
                                          "eval.max_batches": 0})
  if arg == "test":
    c.task = ml_collections.ConfigDict(dict(n_sft=2000, n_pref=1500, n_prompts=256, n_eval=64))
    stages.sft["train.steps"] = 200
    stages.reward["train.steps"] = 100
    stages.dpo["train.steps"] = 60
    stages.ppo["train.steps"] = 24
    stages.grpo["train.steps"] = 24
    for g in vars(stages).values():
      g["logging.progress"] = False
  elif arg:
    raise ValueError(f"configs/quickstart.py: unknown variant {arg!r} (known: test)")
  for name in ("sft", "reward", "dpo", "ppo", "grpo", "evaluate"):
    c[name] = _nest(getattr(stages, name))
  c.lock()
  return c
