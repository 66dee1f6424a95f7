"""The one driver: every stage compiles from shapes alone (the dry run), online stages keep the best
checkpoint and stop early, metrics are read one step late, and a checkpoint of another layout is refused
with a message."""

import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import pytest

from jaxalign.checkpoint import Checkpointer
from jaxalign import plan
from jaxalign.loops import driver, ppo, stages
from tests.conftest import load_config

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
GOLD = "jaxalign.data.tasks.reviews:gold_reward_fn"


def constant_reward(prompts, completions):
  """A reward that never changes: an eval metric that can never improve (drives early stopping)."""
  del prompts
  return [0.0] * len(completions)


def _rows(wd, split):
  with open(os.path.join(wd, "metrics.jsonl")) as f:
    return [r for r in map(json.loads, f) if r["split"] == split]


@pytest.mark.parametrize("stage", ["sft", "reward", "dpo", "ppo", "grpo", "evaluate"])
def test_dry_run_compiles_every_stage_from_shapes_alone(stage):
  cfg = load_config(stage, "tiny", mesh__data=2, mesh__fsdp=4, **(
      {"reward__functions": (GOLD,)} if stage == "grpo" else {}))
  out = plan.compile_plan(cfg)
  want = {"sft": ["train_step"], "reward": ["train_step"], "dpo": ["train_step"], "ppo": ["iteration"],
          "grpo": ["rollout", "update"], "evaluate": ["sample"]}[stage]
  assert sorted(out["programs"]) == sorted(want)
  assert out["mesh"] == {"data": 2, "expert": 1, "fsdp": 4, "tensor": 1}
  for row in out["programs"].values():
    assert row["peak_bytes"] >= row["argument_bytes"] > 0
  if stage in ("dpo", "ppo"):  # A frozen reference (and PPO's reward model) is part of the plan.
    assert out["frozen_bytes_per_device"] > 0


def test_cli_dry_run_writes_the_plan_without_reading_weights(tmp_path, hf_factory):
  model = hf_factory("llama")
  only_config = tmp_path / "cfg_only"
  only_config.mkdir()
  (only_config / "config.json").write_bytes(open(os.path.join(model, "config.json"), "rb").read())
  wd = tmp_path / "plan"
  cmd = [sys.executable, "launch/train.py", "--config=configs/dpo.py:tiny", f"--workdir={wd}", "--dry_run",
         f"--config.model.init={only_config}"]
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8", JAX_PLATFORMS="cpu")
  out = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
  assert out.returncode == 0, out.stderr[-3000:]
  assert "train_step: peak" in out.stdout
  plan = json.load(open(wd / "plan.json"))
  assert plan["stage"] == "dpo" and plan["programs"]["train_step"]["peak_bytes"] > 0


def test_online_stage_stops_early_when_its_best_metric_stalls(task_sft, tmp_path):
  wd = str(tmp_path / "grpo")
  cfg = load_config("grpo", "tiny", model__init=task_sft["sft"], data__train=task_sft["prompts_train"],
                    data__eval=task_sft["prompts_eval"], reward__functions=(GOLD,),
                    reward__eval_functions=("tests.loops.test_driver:constant_reward",), train__steps=6,
                    eval__every=1, eval__max_batches=1, checkpoint__every=100, checkpoint__keep=1,
                    checkpoint__best_metric="eval/reward/constant_reward", checkpoint__best_mode="max",
                    checkpoint__early_stop=1, logging__progress=False, logging__tensorboard=False,
                    export__hf=False, grpo__kl_coef=0.0)
  state = stages.train(cfg, wd)
  # Evals at 0 (baseline), 1 (best), 2 (no better: early stop).
  assert int(state.step) == 2
  assert [r["step"] for r in _rows(wd, "eval")] == [0, 1, 2]
  assert Checkpointer(os.path.join(wd, "checkpoints")).latest_step() == 2
  assert _rows(wd, "summary")  # A stopped-early run is finished: summary (and export) written.


def test_ppo_metrics_are_read_one_step_late(task_sft, task_rm, tmp_path):
  """When the driver asks for batch k+1, step k's metrics are still on the device (not yet in metrics.jsonl):
  the host never waits for an iteration before dispatching the next."""
  wd = str(tmp_path / "ppo")
  cfg = load_config("ppo", "tiny", model__init=task_sft["sft"], reward__init=task_rm,
                    data__train=task_sft["prompts_train"], data__eval=task_sft["prompts_eval"], train__steps=4,
                    eval__every=0, eval__max_batches=1, checkpoint__every=100, logging__progress=False,
                    logging__tensorboard=False, export__hf=False)
  parts = ppo.build(cfg, wd)
  seen = []

  class Recording:
    def __init__(self, it):
      self.it = it

    def __next__(self):
      seen.append(max([r["step"] for r in _rows(wd, "train")], default=0) if os.path.exists(
          os.path.join(wd, "metrics.jsonl")) else 0)
      return next(self.it)

    def state(self):
      return self.it.state()

    def restore(self, st):
      self.it.restore(st)

  parts.batches = Recording(parts.batches)
  driver.run(parts, cfg, wd)
  # Before batch k (k = 1..4) is drawn, rows exist up to step k - 2 (step k - 1's metrics are in flight).
  assert seen == [0, 0, 1, 2]
  assert [r["step"] for r in _rows(wd, "train")] == [1, 2, 3, 4]


def test_checkpoint_of_an_earlier_layout_is_refused_with_a_message(task_sft, tmp_path):
  """The online loop of the previous version saved meta {iteration, kl_coef, rng}; resuming it here names
  the problem instead of failing inside orbax."""
  wd = tmp_path / "old"
  ck = Checkpointer(str(wd / "checkpoints"), async_save=False)
  ck.save(3, {"params": {"x": jnp.zeros(2)}, "opt_state": {"x": jnp.zeros(2)},
              "meta": {"iteration": jnp.int32(3), "kl_coef": jnp.float32(0.1), "rng": jax.random.PRNGKey(0)}},
          {"train": {"epoch": 0, "index": 3}})
  ck.close()
  cfg = load_config("grpo", "tiny", model__init=task_sft["sft"], data__train=task_sft["prompts_train"],
                    data__eval=task_sft["prompts_eval"], reward__functions=(GOLD,), logging__progress=False,
                    logging__tensorboard=False, export__hf=False)
  with pytest.raises(driver.CheckpointLayoutError, match="another layout.*earlier jaxalign.*new --workdir"):
    stages.train(cfg, str(wd))


def test_next_stage_loads_the_best_checkpoint_and_run_json_says_which(tiny, tmp_path):
  """With checkpoint.best_metric set, run.json records the best kept step and a later stage loads it, not the
  latest (best_mode=max on the falling eval loss makes the first eval the best: step 2 of 4)."""
  from jaxalign import checkpoint
  from jaxalign.loops import setup

  wd = str(tmp_path / "sft")
  cfg = load_config("sft", "tiny", model__init=tiny["model"], data__train=tiny["train"], data__eval=tiny["eval"],
                    train__steps=4, train__batch_size=8, eval__every=2, checkpoint__every=2, checkpoint__keep=3,
                    checkpoint__best_metric="eval/loss", checkpoint__best_mode="max", logging__progress=False,
                    logging__tensorboard=False, export__hf=False, logging__report=True)
  stages.train(cfg, wd)
  evals = {r["step"]: r["loss"] for r in _rows(wd, "eval")}
  best = json.load(open(os.path.join(wd, "run.json")))["best"]
  assert best["step"] == max(evals, key=evals.get) == 2 and best["value"] == pytest.approx(evals[2])
  assert Checkpointer(os.path.join(wd, "checkpoints")).latest_step() == 4
  report = open(os.path.join(wd, "report.md")).read()  # Every finished run writes its own small report.
  assert "![curves](curves.png)" in report and "## last eval row (step 4)" in report and "| loss |" in report
  assert open(os.path.join(wd, "curves.png"), "rb").read(4) == b"\x89PNG"
  model_cfg = setup.resolve_model_config(wd, cfg.model)
  params, source = setup.load_model(wd, model_cfg, setup.make_mesh(cfg), jax.random.PRNGKey(0))
  assert source["step"] == 2 and source["checkpoint"].startswith("best eval/loss=")
  _, latest = checkpoint.restore_params_from_run(wd, {"model": params["model"]}, step=4)
  assert latest == 4
