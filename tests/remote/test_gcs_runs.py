"""Runs whose model, data, workdir and exports all live in a bucket (an emulated GCS server on 127.0.0.1, see
tests/gcs.py): the pod recipe. SIGKILL and rerun the same command reaches the straight run's params bit for bit;
DPO starts from the bucket run; the export loads in transformers; a missing path is one line before compiling."""

import json
import os
import random
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from jaxalign import paths
from tests import gcs
from tests.fixtures import WORDS, write_jsonl

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
pytestmark = [pytest.mark.slow(170), pytest.mark.xdist_group("gcs")]
STEPS = 16


@pytest.fixture(scope="module")
def env(gcs_url, tmp_path_factory):
  """Subprocesses inherit the emulator's variables (set by the fixture) and get their own local cache."""
  return dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=4", JAX_PLATFORMS="cpu",
              JAXALIGN_CACHE=str(tmp_path_factory.mktemp("cache")))


@pytest.fixture(scope="module")
def inputs(tiny, gcs_url, tmp_path_factory):
  """The tiny HF model and the datasets, uploaded to the bucket."""
  d = tmp_path_factory.mktemp("prefs")
  rng = random.Random(0)
  rows = []
  for _ in range(64):
    q = " ".join(rng.choice(WORDS) for _ in range(4))
    rows.append({"prompt": q, "chosen": " " + " ".join(reversed(q.split())), "rejected": " " + rng.choice(WORDS)})
  prefs = write_jsonl(str(d / "prefs.jsonl"), rows)
  paths.upload(tiny["model"], "gs://bucket/in/llama")
  out = {"model": "gs://bucket/in/llama"}
  for key, local in (("train", tiny["train"]), ("eval", tiny["eval"]), ("prefs", prefs)):
    out[key] = f"gs://bucket/in/{os.path.basename(local)}"
    with open(local) as f:
      paths.write_text(out[key], f.read())
  return out


def _sft(inputs, wd, steps=STEPS):
  return [sys.executable, "launch/train.py", "--config=configs/sft.py:tiny", f"--workdir={wd}",
          f"--config.model.init={inputs['model']}", f"--config.data.train={inputs['train']}",
          f"--config.data.eval={inputs['eval']}", f"--config.train.steps={steps}", "--config.checkpoint.every=2",
          "--config.logging.every=1", "--config.eval.every=0", "--config.logging.progress=false",
          "--config.train.batch_size=4"]


def _losses(wd):
  out = {}
  for r in map(json.loads, paths.read_text(paths.join(wd, "metrics.jsonl")).splitlines()):
    if r["split"] == "train":
      assert out.setdefault(r["step"], r["loss"]) == r["loss"]  # A replayed step gives the same loss.
  return out


def _read(path) -> bytes:
  with paths.open(path, "rb") as f:
    return f.read()


@pytest.fixture(scope="module")
def straight(inputs, env):
  wd = "gs://bucket/straight"
  out = subprocess.run(_sft(inputs, wd), cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
  assert out.returncode == 0, out.stderr[-3000:]
  return wd


def test_sft_in_a_bucket_sigkilled_and_rerun_reaches_identical_params(inputs, env, straight):
  wd = "gs://bucket/killed"
  rng = random.Random(1)
  kills = 0
  for _ in range(3):
    proc = subprocess.Popen(_sft(inputs, wd), cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    t = time.time()
    while proc.poll() is None and not paths.exists(paths.join(wd, "metrics.jsonl")) and time.time() - t < 300:
      time.sleep(0.2)  # The first upload of metrics.jsonl comes with the first checkpoint save: in training.
    time.sleep(rng.uniform(0.0, 1.5))
    if proc.poll() is not None:
      break
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    kills += 1
  final = subprocess.run(_sft(inputs, wd), cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
  assert final.returncode == 0, final.stderr[-3000:]
  assert kills >= 2
  assert _losses(wd) == _losses(straight) and sorted(_losses(wd)) == list(range(1, STEPS + 1))
  a = _read(paths.join(wd, "export", "hf", "model.safetensors"))
  assert a == _read(paths.join(straight, "export", "hf", "model.safetensors"))  # Bit for bit.


def test_run_files_export_and_tensorboard_land_in_the_bucket_and_transformers_loads_the_export(straight):
  import torch
  import transformers

  for name in ("run.json", "data_report.json", "tokenizer/tokenizer.json", "checkpoints", "export/hf/config.json"):
    assert paths.exists(paths.join(straight, name)), name
  assert paths.epath.Path(straight, "tensorboard").exists() and any(paths.epath.Path(straight, "tensorboard").iterdir())
  info = json.loads(paths.read_text(paths.join(straight, "run.json")))
  assert info["tokenizer"] == "gs://bucket/straight/tokenizer"
  assert info["sources"]["model"]["path"] == "gs://bucket/in/llama"
  local = paths.local_copy(paths.join(straight, "export", "hf"))
  model = transformers.AutoModelForCausalLM.from_pretrained(local, dtype=torch.float32)
  tok = transformers.AutoTokenizer.from_pretrained(local)
  from jaxalign.models import hf
  st = hf.SafetensorsDir(paths.join(straight, "export", "hf"))  # Ranged reads from the bucket.
  np.testing.assert_array_equal(model.model.embed_tokens.weight.detach().numpy(),
                                st.get("model.embed_tokens.weight"))
  ids = tok("the movie was good", return_tensors="pt").input_ids
  assert torch.isfinite(model(ids).logits).all()


def test_dpo_from_the_bucket_run(inputs, env, straight):
  wd = "gs://bucket/dpo"
  cmd = [sys.executable, "launch/train.py", "--config=configs/dpo.py:tiny", f"--workdir={wd}",
         f"--config.model.init={straight}", f"--config.data.train={inputs['prefs']}", "--config.train.steps=2",
         "--config.logging.every=1", "--config.eval.every=0", "--config.logging.progress=false", "--config.logging.tensorboard=false",
         "--config.train.batch_size=4", "--config.data.eval_fraction=0.0"]
  out = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
  assert out.returncode == 0, out.stderr[-3000:]
  src = json.loads(paths.read_text(paths.join(wd, "run.json")))["sources"]
  assert src["model"]["path"] == straight and src["model"]["step"] == STEPS
  assert src["reference"]["path"] == straight
  assert sorted(_losses(wd)) == [1, 2]
  assert paths.exists(paths.join(wd, "export", "hf", "model.safetensors"))


@pytest.mark.parametrize("key,value,message", [
    ("data.train", "gs://bucket/in/none.jsonl", "not found"),
    ("model.init", "gs://no-such-bucket/llama", "not found (bucket gs://no-such-bucket does not exist"),
])
def test_missing_bucket_path_is_one_line_naming_key_before_anything_loads(inputs, env, key, value, message):
  wd = f"gs://bucket/bad_{key.replace('.', '_')}"
  cmd = _sft(inputs, wd) + [f"--config.{key}={value}"]
  out = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
  assert out.returncode == 2, out.stderr[-3000:]
  assert f"error: {key}={value}: {message}" in out.stdout
  assert "Traceback" not in out.stderr
  assert not paths.exists(paths.join(wd, "tokenizer"))  # Stopped before the model, tokenizer or a compile.


def test_two_processes_share_one_bucket_workdir_and_resume_the_same_step(inputs, env):
  """jax.distributed over gloo, 2 processes x 2 CPU devices: one metrics row per step and one export (the
  primary's), and after a stop both processes restore the same checkpoint from the bucket."""
  wd = "gs://bucket/two"
  env = dict(env, XLA_FLAGS="--xla_force_host_platform_device_count=2")

  def run(extra):
    port = gcs.free_port()
    cmd = _sft(inputs, wd, steps=4) + ["--config.mesh.data=2", "--config.mesh.fsdp=-1", "--config.eval.every=0",
                                       "--config.logging.tensorboard=false", *extra]
    ps = [subprocess.Popen(cmd + [f"--coordinator=127.0.0.1:{port}", "--num_processes=2", f"--process_id={i}"],
                           cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
          for i in range(2)]
    outs = [p.communicate(timeout=600)[0] for p in ps]
    for p, o in zip(ps, outs):
      assert p.returncode == 0, o[-3000:]
    return outs

  run(["--config.train.run_steps=2"])
  assert sorted(_losses(wd)) == [1, 2] and not paths.exists(paths.join(wd, "export"))
  outs = run([])
  for o in outs:
    assert f"resumed sft from {wd}/checkpoints step 2" in o
  rows = [json.loads(r) for r in paths.read_text(paths.join(wd, "metrics.jsonl")).splitlines()]
  assert [r["step"] for r in rows if r["split"] == "train"] == [1, 2, 3, 4]  # Written once: the primary.
  assert paths.exists(paths.join(wd, "export", "hf", "model.safetensors"))
