"""The quickstart pipeline (smaller variant) end to end: each method raises the gold reward over SFT."""

import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.slow(300)
def test_pipeline_raises_gold_reward_over_sft(tmp_path):
  wd = str(tmp_path / "qs")
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}  # One CPU device, as on a laptop.
  out = subprocess.run([sys.executable, "launch/pipeline.py", "--config=configs/quickstart.py:test",
                        f"--workdir={wd}"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=1500)
  assert out.returncode == 0, out.stderr[-4000:]
  summary = json.load(open(os.path.join(wd, "summary.json")))
  table = {r["policy"]: r for r in summary["table"]}
  print(out.stdout[-1200:])
  sft = table["sft"]
  for m in ("dpo", "ppo", "grpo"):
    assert table[m]["gold_reward"] > sft["gold_reward"], (m, table[m], sft)
    assert table[m]["win_rate_gold"] > 0.5, m
    assert table[m]["kl"] > 0, m
    assert table[m]["fluent"] > 0.6, m  # Gains are not bought with word salad.
  assert summary["rm_accuracy"] > 0.6
  assert os.path.exists(os.path.join(wd, "report.md")) and os.path.exists(os.path.join(wd, "gold_vs_kl.png"))
  assert "[pipeline] stage 1/9 sft" in out.stdout and "[pipeline] stage 9/9 eval grpo" in out.stdout
  assert "Traceback" not in out.stderr and "TPU_ACCELERATOR_TYPE" not in out.stderr
  assert " ± " in open(os.path.join(wd, "report.md")).read()  # Means with their standard errors.
  # Rerunning the same command skips finished stages.
  again = subprocess.run([sys.executable, "launch/pipeline.py", "--config=configs/quickstart.py:test",
                          f"--workdir={wd}"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
  assert again.returncode == 0 and again.stdout.count("done already") == 9


def test_pipeline_refuses_a_bucket_workdir_in_one_line():
  """The pipeline is the laptop path: a gs:// workdir is one clear line and exit 2, not a local './gs:' folder."""
  out = subprocess.run([sys.executable, "launch/pipeline.py", "--config=configs/quickstart.py:test",
                        "--workdir=gs://bucket/run"], cwd=ROOT, capture_output=True, text=True, timeout=120)
  assert out.returncode == 2, out.stderr
  assert out.stderr.strip().splitlines() == [
      "error: --workdir=gs://bucket/run: the pipeline keeps its workdir local; give a local directory "
      "(for a bucket, run each stage with launch/train.py --workdir=gs://...)"]
  assert not os.path.exists(os.path.join(ROOT, "gs:"))


@pytest.mark.slow(170)
def test_arithmetic_pipeline_grpo_with_a_verifier_beats_sft(tmp_path):
  """The verifiable-reward quickstart: GRPO with the exact-answer verifier raises held-out accuracy above the
  SFT policy's (which imitated demonstrations with slips); pass@k, truncation and length are reported."""
  wd = str(tmp_path / "qa")
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
  out = subprocess.run([sys.executable, "launch/pipeline.py", "--config=configs/quickstart.py:arithmetic,test",
                        f"--workdir={wd}"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=1200)
  assert out.returncode == 0, out.stderr[-4000:]
  print(out.stdout[-600:])
  table = {r["policy"]: r for r in json.load(open(os.path.join(wd, "summary.json")))["table"]}
  sft, grpo = table["sft"], table["grpo"]
  gap = grpo["accuracy"] - sft["accuracy"]
  assert gap > 0.08 and gap > 3 * (sft["accuracy_se"] ** 2 + grpo["accuracy_se"] ** 2) ** 0.5, (sft, grpo)
  assert grpo["pass_at_k"] >= grpo["accuracy"] and 0 <= grpo["truncated"] <= 1 and grpo["length"] > 1
  report = open(os.path.join(wd, "report.md")).read()
  assert "pass@4" in report and "compile" in report and os.path.exists(os.path.join(wd, "curves.png"))
  assert "[pipeline] stage 4/4 eval grpo" in out.stdout and "Traceback" not in out.stderr
