"""The compile plan for a named TPU topology, compiled here by libtpu without a TPU: Cloud TPU names map to
the right slices, and a tiny model's plan holds memory against HBM, cost-model time, MFU and collectives."""

import json
import os
import subprocess
import sys

import pytest

from jaxalign import topology

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.parametrize("name,shape,chips", [("v5p-8", (2, 2, 1), 4), ("v5p-128", (4, 4, 4), 64),
                                              ("v5p-256", (4, 4, 8), 128), ("v4-32", (2, 2, 4), 16),
                                              ("v5e-16", (4, 4), 16), ("v5litepod-256", (16, 16), 256),
                                              ("v6e-8", (2, 4), 8)])
def test_cloud_tpu_names_map_to_their_slices(name, shape, chips):
  t = topology.parse(name)
  assert (t.shape, t.chips) == (shape, chips)
  assert topology.parse(name, num_slices=2).chips == 2 * chips


def test_unknown_or_odd_topology_names_are_errors_naming_the_flag():
  with pytest.raises(ValueError, match="--topology='tpu-9'"):
    topology.parse("tpu-9")
  with pytest.raises(ValueError, match="counts TensorCores, 2 per chip"):
    topology.parse("v5p-3")


def test_cli_plan_for_a_tpu_topology_without_a_tpu(tmp_path):
  pytest.importorskip("libtpu")
  wd = tmp_path / "plan"
  cmd = [sys.executable, "launch/train.py", "--config=configs/sft.py:tiny", f"--workdir={wd}", "--dry_run",
         "--topology=v5p-8", "--config.mesh.data=1", "--config.mesh.fsdp=-1", "--config.model.dtype=bfloat16",
         "--config.train.seq_len=128", "--config.model.vocab_tiles=4"]
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  out = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
  assert out.returncode == 0, out.stderr[-3000:]
  plan = json.load(open(wd / "plan.json"))
  assert plan["devices"] == 4 and plan["mesh"]["fsdp"] == 4 and plan["chip"]["name"] == "v5p"
  # Params and AdamW moments sharded over the 4 fsdp devices (not replicated): ~1/4 of the f32 bytes each.
  assert plan["params_bytes_per_device"] < 0.4 * 4 * plan["params_total"]
  assert plan["opt_state_bytes_per_device"] < 0.8 * 4 * plan["params_total"]
  row = plan["programs"]["train_step"]
  assert row["fits"] and 0 < row["hbm_fraction"] < 0.01
  assert row["step_seconds"] > 0 and 0 < row["mfu"] < 1
  assert row["collectives"].get("all-gather", 0) + row["collectives"].get("all-reduce", 0) > 0  # FSDP over 4.
  assert "fits" in out.stdout and "train_step: peak" in out.stdout
  # attention='auto' on a TPU mesh is the Pallas splash kernel (a tpu_custom_call in the compiled HLO); the
  # vocabulary-tiled LM head compiles for the TPU too.
  assert row["attention"].startswith("pallas")
