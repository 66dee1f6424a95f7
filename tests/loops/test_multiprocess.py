"""Two local processes x 4 CPU devices (gloo) reproduce one process x 8 devices, and restore each other's
checkpoints: the multi-controller path TPU pods and SLURM clusters use."""

import json
import os
import shutil
import socket
import subprocess
import sys

import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _port():
  s = socket.socket()
  s.bind(("127.0.0.1", 0))
  p = s.getsockname()[1]
  s.close()
  return p


def _run(args, wd, procs):
  base = [sys.executable, "launch/train.py", f"--workdir={wd}"] + args
  if procs == 1:
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8", JAX_PLATFORMS="cpu")
    out = subprocess.run(base, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    return
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=4", JAX_PLATFORMS="cpu")
  port = _port()
  ps = [subprocess.Popen(base + [f"--coordinator=127.0.0.1:{port}", "--num_processes=2", f"--process_id={i}"],
                         cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        for i in range(2)]
  outs = [p.communicate(timeout=600)[0] for p in ps]
  for p, o in zip(ps, outs):
    assert p.returncode == 0, o[-3000:]


def _losses(wd, key="loss", split="train"):
  with open(os.path.join(wd, "metrics.jsonl")) as f:
    return {r["step"]: r[key] for r in map(json.loads, f) if r["split"] == split}


def _check_pair(args, tmp_path, name, steps, more, extra=()):
  a, b = str(tmp_path / f"{name}_2proc"), str(tmp_path / f"{name}_1proc")
  common = args + [f"--config.train.steps={steps}", "--config.optimizer.schedule=constant",
                   "--config.optimizer.warmup_steps=0", "--config.logging.every=1", "--config.eval.every=0",
                   "--config.logging.progress=false", "--config.logging.tensorboard=false", "--config.export.hf=false",
                   "--config.mesh.data=2", "--config.mesh.fsdp=-1", "--config.train.batch_size=8", *extra]
  _run(common, a, 2)
  _run(common, b, 1)
  la, lb = _losses(a), _losses(b)
  assert sorted(la) == list(range(1, steps + 1))
  np.testing.assert_allclose([la[s] for s in sorted(la)], [lb[s] for s in sorted(lb)], rtol=0, atol=1e-6)
  if not more:
    return la, None
  # Cross-restore: continue the 2-process run in 1 process and the 1-process run in 2 processes.
  a2, b2 = str(tmp_path / f"{name}_a2"), str(tmp_path / f"{name}_b2")
  shutil.copytree(a, a2)
  shutil.copytree(b, b2)
  longer = [x if not x.startswith("--config.train.steps=") else f"--config.train.steps={steps + more}" for x in common]
  _run(longer, a2, 1)
  _run(longer, b2, 2)
  la2, lb2 = _losses(a2), _losses(b2)
  tail = range(steps + 1, steps + more + 1)
  np.testing.assert_allclose([la2[s] for s in tail], [lb2[s] for s in tail], rtol=0, atol=1e-6)
  return la, la2


@pytest.mark.slow(150)
def test_sft_two_processes_match_one_and_restore_each_other(tiny, tmp_path):
  """An MoE SFT run (Qwen3-MoE) with experts over a 4-way expert axis spanning both processes (2 experts per
  device; tokens gathered and reduce-scattered across processes) equals one process x 8 devices, and each
  run continues from the other's checkpoint (2 -> 1 process and 1 -> 2) to the same losses. One run covers
  the dense parts too: attention, embeddings and LM head are FSDP-sharded over the same mesh."""
  from tests.fixtures import make_moe
  model = make_moe(str(tmp_path / "moe"), tiny["model"])
  args = ["--config=configs/sft.py:tiny", f"--config.model.init={model}", f"--config.data.train={tiny['train']}",
          f"--config.data.eval={tiny['eval']}"]
  _check_pair(args, tmp_path, "moe", steps=3, more=2, extra=("--config.mesh.data=1", "--config.mesh.expert=4"))
  rows = [json.loads(x) for x in open(tmp_path / "moe_1proc" / "metrics.jsonl")]
  assert all(r["router_aux_loss"] > 0.9 for r in rows if r["split"] == "train")


def _online_pair(args, tmp_path, name, keys):
  """Same sampled rollouts and updates (threefry keys are sharding-invariant) in 2x4 and 1x8 devices."""
  common = args + ["--config.train.steps=3", "--config.eval.every=2", "--config.eval.max_batches=2",
                   "--config.logging.every=1", "--config.logging.progress=false", "--config.logging.tensorboard=false",
                   "--config.export.hf=false", "--config.mesh.data=2", "--config.mesh.fsdp=-1"]
  a, b = str(tmp_path / f"{name}_2proc"), str(tmp_path / f"{name}_1proc")
  _run(common, a, 2)
  _run(common, b, 1)
  for split, key in keys:
    la, lb = _losses(a, key, split), _losses(b, key, split)
    assert sorted(la) == sorted(lb) and la, (split, key)
    np.testing.assert_allclose([la[s] for s in sorted(la)], [lb[s] for s in sorted(lb)], rtol=0, atol=1e-5,
                               err_msg=f"{split}/{key}")


@pytest.mark.slow(110)
def test_ppo_two_processes_match_one(task_sft, task_rm, tmp_path):
  args = ["--config=configs/ppo.py:tiny", f"--config.model.init={task_sft['sft']}", f"--config.reward.init={task_rm}",
          f"--config.data.train={task_sft['prompts_train']}", f"--config.data.eval={task_sft['prompts_eval']}",
          "--config.reward.eval_functions=jaxalign.data.tasks.reviews:gold_reward_fn"]
  _online_pair(args, tmp_path, "ppo", [("train", "policy_loss"), ("train", "value_loss"), ("train", "kl"),
                                       ("train", "score"), ("eval", "reward/gold_reward_fn"), ("eval", "kl")])


@pytest.mark.slow(110)
def test_grpo_two_processes_match_one(task_sft, task_rm, tmp_path):
  # Reward model and a Python reward function: each process decodes and scores its own rows.
  args = ["--config=configs/grpo.py:tiny", f"--config.model.init={task_sft['sft']}", f"--config.reward.init={task_rm}",
          "--config.reward.functions=jaxalign.data.tasks.reviews:gold_reward_fn",
          f"--config.data.train={task_sft['prompts_train']}", f"--config.data.eval={task_sft['prompts_eval']}"]
  _online_pair(args, tmp_path, "grpo", [("train", "loss"), ("train", "score"), ("train", "reward/gold_reward_fn"),
                                        ("eval", "reward/gold_reward_fn"), ("eval", "score")])
