"""PPO and GRPO on the reviews task: gold reward rises, KL is reported and controlled, compile once, resume."""

import json
import os

import jax
import numpy as np

from jaxalign.loops import stages
from tests.conftest import load_config

GOLD = "jaxalign.data.tasks.reviews:gold_reward_fn"
FLUENT = "jaxalign.data.tasks.reviews:fluency_fn"


def _rows(wd, split):
  with open(os.path.join(wd, "metrics.jsonl")) as f:
    return [r for r in map(json.loads, f) if r["split"] == split]


def _ppo_cfg(task_sft, task_rm, **kw):
  base = dict(model__init=task_sft["sft"], reward__init=task_rm, data__train=task_sft["prompts_train"],
              data__eval=task_sft["prompts_eval"], reward__eval_functions=(GOLD, FLUENT), optimizer__learning_rate=3e-4,
              eval__max_batches=8, logging__progress=False, logging__tensorboard=False, export__hf=False)
  base.update(kw)
  return load_config("ppo", "tiny", **base)


def test_ppo_raises_model_and_gold_reward_with_kl_controlled(task_sft, task_rm, tmp_path):
  wd = str(tmp_path / "ppo")
  # A target the policy's KL passes within a few steps: with 1.0 the KL hovered at the target for most of the
  # run and the coefficient's direction was a coin flip between numerically different runs.
  stages.train(_ppo_cfg(task_sft, task_rm, train__steps=30, eval__every=30, ppo__target_kl=0.25,
                            ppo__kl_horizon=200), wd)
  ev = _rows(wd, "eval")
  first, last = ev[0], ev[-1]
  print(f"PPO eval: gold {first['reward/gold_reward_fn']:.3f} -> {last['reward/gold_reward_fn']:.3f}, "
        f"RM score {first['score']:.3f} -> {last['score']:.3f}, KL {last['kl']:.3f}, "
        f"fluency {first['reward/fluency_fn']:.3f} -> {last['reward/fluency_fn']:.3f}")
  assert first["step"] == 0 and last["step"] == 30
  assert last["reward/gold_reward_fn"] > first["reward/gold_reward_fn"] + 0.3
  assert last["score"] > first["score"] + 0.2
  train = _rows(wd, "train")
  assert all(np.isfinite(r["kl"]) for r in train)
  # KL above target -> the adaptive controller raised the coefficient.
  assert np.mean([r["kl"] for r in train]) > 0.25
  assert train[-1]["kl_coef"] > train[0]["kl_coef"]
  assert _rows(wd, "summary")[0]["compiles"] == 1
  assert os.path.exists(os.path.join(wd, "eval_samples.jsonl"))


def test_ppo_resume_is_exact(task_sft, task_rm, tmp_path):
  kw = dict(train__steps=6, eval__every=0, checkpoint__every=3, logging__every=1, eval__max_batches=1)
  a = stages.train(_ppo_cfg(task_sft, task_rm, **kw), str(tmp_path / "a"))
  stages.train(_ppo_cfg(task_sft, task_rm, train__run_steps=3, **kw), str(tmp_path / "b"))
  b = stages.train(_ppo_cfg(task_sft, task_rm, **kw), str(tmp_path / "b"))
  la = [(r["score"], r["policy_loss"]) for r in _rows(str(tmp_path / "a"), "train")]
  lb = [(r["score"], r["policy_loss"]) for r in _rows(str(tmp_path / "b"), "train")]
  assert la == lb and len(la) == 6
  jax.tree.map(lambda x, y: np.testing.assert_array_equal(np.asarray(x), np.asarray(y)), a.params, b.params)


def test_grpo_raises_python_reward(task_sft, tmp_path):
  wd = str(tmp_path / "grpo")
  cfg = load_config("grpo", "tiny", model__init=task_sft["sft"], data__train=task_sft["prompts_train"],
                    data__eval=task_sft["prompts_eval"], reward__functions=(GOLD,), reward__eval_functions=(GOLD, FLUENT),
                    optimizer__learning_rate=3e-4, train__steps=30, eval__every=30, eval__max_batches=8,
                    logging__progress=False, logging__tensorboard=False, export__hf=False)
  stages.train(cfg, wd)
  ev = _rows(wd, "eval")
  print(f"GRPO eval gold {ev[0]['reward/gold_reward_fn']:.3f} -> {ev[-1]['reward/gold_reward_fn']:.3f}")
  assert ev[-1]["reward/gold_reward_fn"] > ev[0]["reward/gold_reward_fn"] + 0.2
  assert _rows(wd, "summary")[0]["compiles"] == 2  # Rollout and update, each compiled once.


def test_grpo_variants_run(task_sft, tmp_path):
  for variant in ("rloo",):  # dr_grpo/dapo/gspo differ only in flags covered by tests/losses/test_rl.py.
    wd = str(tmp_path / variant)
    cfg = load_config("grpo", f"{variant},tiny", model__init=task_sft["sft"], data__train=task_sft["prompts_train"],
                      data__eval=task_sft["prompts_eval"], reward__functions=(GOLD,), train__steps=2, eval__every=0,
                      eval__max_batches=1, logging__progress=False, logging__tensorboard=False, export__hf=False)
    stages.train(cfg, wd)
    assert all(np.isfinite(r["loss"]) for r in _rows(wd, "train")), variant


class Flaky:
  """A calculator that raises on its second call in every fourth episode (an environment's bug)."""

  count = 0

  def __init__(self):
    from jaxalign.rewards.environments import Calculator
    self.inner, Flaky.count = Calculator(), Flaky.count + 1
    self.bad = Flaky.count % 4 == 0

  def reset(self, row):
    return self.inner.reset(row)

  def step(self, text):
    if self.bad:
      raise RuntimeError("tool crashed")
    obs, r, done = self.inner.step(text + " <calc>1 + 2</calc>")  # Always a call: episodes go to the limit.
    return obs, 0.25, done


def test_grpo_multi_turn_episodes_run_train_and_evaluate(task_sft, tmp_path):
  """GRPO over tool episodes: the environment's reward reaches the update, failures and turn limits end
  episodes (metrics), the eval runs the same episodes, one compile of each program."""
  wd = str(tmp_path / "env")
  cfg = load_config("grpo", "tiny", model__init=task_sft["sft"], data__train=task_sft["prompts_train"],
                    data__eval=task_sft["prompts_eval"], env__name="tests.loops.test_online_runs:Flaky",
                    env__max_turns=2, env__turn_tokens=8, train__seq_len=128, train__steps=2, eval__every=2, eval__max_batches=1,
                    logging__progress=False, logging__tensorboard=False, export__hf=False)
  stages.train(cfg, wd)
  train, ev = _rows(wd, "train"), _rows(wd, "eval")
  for r in train:
    assert r["env_failures"] > 0 and r["turn_limit"] > 0 and 1 <= r["turns"] <= 2
    assert 0 < r["reward/env"] <= 0.5 and np.isfinite(r["loss"])
  assert 0 < ev[-1]["reward/env"] <= 0.5 and "no_eos_fraction" in ev[-1]
  assert _rows(wd, "summary")[0]["compiles"] == 3  # A policy turn, the scoring pass, the update.
