"""SFT end to end: CLI on 8 devices, HF export parity with PyTorch, exact resume, compile once."""

import json
import os
import subprocess
import sys

import jax
import numpy as np
import torch

from jaxalign.data import batching, datasets
from jaxalign.loops import stages
from tests.conftest import load_config

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _rows(workdir, split):
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return [r for r in map(json.loads, f) if r["split"] == split]


def test_cli_sft_trains_and_export_matches_pytorch(tiny, tmp_path):
  wd = str(tmp_path / "sft")
  cmd = [sys.executable, "launch/train.py", "--config=configs/sft.py:tiny", f"--workdir={wd}",
         f"--config.model.init={tiny['model']}", f"--config.data.train={tiny['train']}",
         f"--config.data.eval={tiny['eval']}", "--config.mesh.data=4", "--config.mesh.fsdp=2",
         "--config.train.steps=30", "--config.logging.every=1", "--config.eval.every=15",
         "--config.logging.progress=false"]
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8", JAX_PLATFORMS="cpu")
  out = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
  assert out.returncode == 0, out.stderr[-3000:]
  train, evals = _rows(wd, "train"), _rows(wd, "eval")
  assert len(train) == 30 and len(evals) == 2
  assert np.mean([r["loss"] for r in train[-5:]]) < np.mean([r["loss"] for r in train[:5]]) - 0.3
  assert evals[-1]["loss"] < evals[0]["loss"]
  assert _rows(wd, "summary")[0]["compiles"] == 1
  run = json.load(open(os.path.join(wd, "run.json")))
  assert run["sources"]["model"]["path"] == os.path.abspath(tiny["model"])

  # The exported checkpoint, evaluated by PyTorch on the same eval rows, gives jaxalign's last eval loss.
  import transformers
  model = transformers.AutoModelForCausalLM.from_pretrained(os.path.join(wd, "export", "hf"), dtype=torch.float32)
  cfg = load_config("sft", "tiny", model__init=tiny["model"], data__train=tiny["train"], data__eval=tiny["eval"])
  tok = transformers.AutoTokenizer.from_pretrained(os.path.join(wd, "export", "hf"))
  _, ev_examples, _ = datasets.sft_examples(cfg, tok)
  total, count = 0.0, 0.0
  for b in batching.eval_batches(ev_examples, batch_size=8, seq_len=cfg.train.seq_len):
    with torch.no_grad():
      logits = model(input_ids=torch.tensor(b["tokens"]).long(),
                     attention_mask=torch.tensor(b["segment_ids"] > 0).long()).logits
    lp = torch.log_softmax(logits.double(), -1).gather(-1, torch.tensor(b["targets"]).long()[..., None])[..., 0]
    total -= float((lp * torch.tensor(b["weights"]).double()).sum())
    count += float(b["weights"].sum())
  assert abs(total / count - evals[-1]["loss"]) <= 1e-4


def test_unknown_override_is_an_error(tmp_path):
  out = subprocess.run([sys.executable, "launch/train.py", "--config=configs/sft.py", f"--workdir={tmp_path}",
                        "--config.optimizer.lerning_rate=1e-3"], cwd=ROOT, capture_output=True, text=True,
                       timeout=120)
  assert out.returncode != 0
  assert "lerning_rate" in out.stderr


def _cfg(tiny, **kw):
  base = dict(model__init=tiny["model"], data__train=tiny["train"], data__eval=tiny["eval"], mesh__data=2,
              mesh__fsdp=2, mesh__tensor=2, train__steps=20, logging__every=1, logging__progress=False,
              checkpoint__every=5, eval__every=10, export__hf=False, logging__tensorboard=False)
  base.update(kw)
  return load_config("sft", "tiny", **base)


def test_resume_is_exact(tiny, tmp_path):
  a = stages.train(_cfg(tiny), str(tmp_path / "a"))
  b1 = stages.train(_cfg(tiny, train__run_steps=10), str(tmp_path / "b"))
  assert int(b1.step) == 10
  b = stages.train(_cfg(tiny), str(tmp_path / "b"))
  la = [r["loss"] for r in _rows(str(tmp_path / "a"), "train")]
  lb = [r["loss"] for r in _rows(str(tmp_path / "b"), "train")]
  assert len(la) == len(lb) == 20
  assert la == lb
  jax.tree.map(lambda x, y: np.testing.assert_array_equal(np.asarray(x), np.asarray(y)), a.params, b.params)
  wq = b.params["model"]["layers"]["wq"]
  expected = jax.sharding.NamedSharding(wq.sharding.mesh, jax.sharding.PartitionSpec(None, "fsdp", "tensor", None))
  assert wq.sharding.is_equivalent_to(expected, wq.ndim)
  assert dict(wq.sharding.mesh.shape) == {"data": 2, "expert": 1, "fsdp": 2, "tensor": 2}


def test_padded_buckets_compile_once_per_bucket(tiny, tmp_path):
  wd = str(tmp_path / "p")
  stages.train(_cfg(tiny, data__pack=False, data__buckets=(40, 52), train__batch_size=4, train__steps=12, checkpoint__every=100),
                    wd)
  summary = _rows(wd, "summary")[0]
  assert 1 < summary["buckets"] <= 3
  assert summary["buckets"] <= summary["shapes"] <= 4 * summary["buckets"]  # Loss windows: <= 4 per bucket.
  assert summary["compiles"] == summary["shapes"]
