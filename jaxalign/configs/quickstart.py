"""The whole alignment pipeline on a built-in task.

  python launch/pipeline.py --config=configs/quickstart.py --workdir=runs/quickstart
  python launch/pipeline.py --config=configs/quickstart.py:arithmetic --workdir=runs/arithmetic

Default (reviews): SFT -> reward model -> DPO, PPO, GRPO -> eval, judged by a hidden gold reward.
`:arithmetic` (verifiable rewards): addition problems with reference answers; SFT on imperfect
demonstrations (30% have one wrong digit) -> GRPO with the exact-answer verifier -> eval of both policies
(accuracy as mean@4 and pass@4 over 4 samples per held-out problem, truncation rate, length).

Each stage is an ordinary `launch/train.py` run; the groups below are the `--config.*` overrides it gets.
Sizes: `:test` (smaller and faster, used by the test suite), e.g. `:arithmetic,test`.
"""

import types

import ml_collections

from jaxalign.errors import ConfigError

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


EXACT = "jaxalign.rewards.verifiers:exact_answer"


def arithmetic(test: bool) -> ml_collections.ConfigDict:
  """The verifiable-reward pipeline: SFT -> GRPO (exact-answer verifier) -> evaluation of both."""
  c = ml_collections.ConfigDict()
  c.seed = 0
  c.task = ml_collections.ConfigDict(dict(name="arithmetic", n_sft=4000, n_prompts=2000, n_eval=200, noise=0.3,
                                          reverse=True))
  c.methods = ("grpo",)
  common = {"seed": 0, "logging.progress": not test}
  short = {"rollout.prompt_len": 8, "train.seq_len": 16}  # 6-token problems, answers of 2-3 digits + EOS.
  c.sft = _nest({**common, "model.preset": "small", "train.steps": 600, "train.batch_size": 64,
                 "train.seq_len": 24, "optimizer.learning_rate": 2e-3, "optimizer.warmup_steps": 20,
                 "eval.every": 300, "checkpoint.every": 600, "checkpoint.best_metric": ""})
  c.grpo = _nest({**common, **short, "train.batch_size": 32, "grpo.group_size": 8, "grpo.kl_coef": 0.0,
                  "train.steps": 100 if test else 150, "optimizer.learning_rate": 2e-4, "reward.functions": (EXACT,),
                  "eval.every": 50 if test else 25, "eval.max_batches": 4 if test else 7, "logging.every": 5,
                  "eval.samples_per_prompt": 1 if test else 4,
                  "checkpoint.every": 1000})
  c.evaluate = _nest({**common, **short, "reward.eval_functions": (EXACT,), "eval.samples_per_prompt": 4,
                      "eval.batch_size": 50, "eval.max_batches": 0})
  c.lock()
  return c


def get_config(arg: str | None = None):
  names = [n for n in (arg or "").split(",") if n]
  unknown = [n for n in names if n not in ("test", "arithmetic")]
  if unknown:
    raise ConfigError(f"configs/quickstart.py: unknown variant {unknown[0]!r} (known: arithmetic, test)")
  if "arithmetic" in names:
    return arithmetic("test" in names)
  arg = "test" if "test" in names else ""
  c = ml_collections.ConfigDict()
  c.seed = 0
  c.task = ml_collections.ConfigDict(dict(name="reviews", n_sft=4000, n_pref=3000, n_prompts=1000, n_eval=256))
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
    c.task = ml_collections.ConfigDict(dict(name="reviews", n_sft=2000, n_pref=1500, n_prompts=256, n_eval=64))
    stages.sft["train.steps"] = 200
    stages.reward["train.steps"] = 100
    stages.dpo["train.steps"] = 60
    stages.ppo["train.steps"] = 24
    stages.grpo["train.steps"] = 24
    for g in vars(stages).values():
      g["logging.progress"] = False
  for name in ("sft", "reward", "dpo", "ppo", "grpo", "evaluate"):
    c[name] = _nest(getattr(stages, name))
  c.lock()
  return c
