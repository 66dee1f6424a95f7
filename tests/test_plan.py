"""The compile plan for a named TPU topology, compiled here by libtpu without a TPU: Cloud TPU names map to
the right slices, and a tiny model's plan holds memory against HBM, cost-model time, MFU and collectives."""

import json
import os
import subprocess
import sys
import warnings

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


def test_slices_are_described_with_their_torus_wrap_so_fsdp_gathers_stay_all_gathers():
  """Without the wraparound links libtpu lowers a 4x4x4 slice's FSDP weight all-gather as zeros +
  dynamic-update-slice + all-reduce (1.3 ms per Llama-3-8B layer in the cost model)."""
  assert topology.parse("v5p-128").wrap == (True, True, True)
  assert topology.parse("v5p-256").wrap == (True, True, True)
  assert topology.parse("v5p-16").wrap == (False, False, False)
  assert topology.parse("v5e-256").wrap == (True, True, False) and topology.parse("v5e-16").wrap[0] is False
  pytest.importorskip("libtpu")
  import jax
  import jax.numpy as jnp
  from jax.sharding import NamedSharding, PartitionSpec as P

  from jaxalign import sharding
  mesh = sharding.make_mesh(1, -1, 1, devices=topology.parse("v5p-128").devices())
  x = jax.ShapeDtypeStruct((64, 256, 512), jnp.bfloat16, sharding=NamedSharding(mesh, P(("data", "fsdp"))))
  w = jax.ShapeDtypeStruct((512, 1024), jnp.float32, sharding=NamedSharding(mesh, P("fsdp", None)))
  loss = lambda x, w: jnp.sum((x @ w.astype(jnp.bfloat16)).astype(jnp.float32) ** 2)  # noqa: E731
  hlo = jax.jit(jax.grad(loss, argnums=1)).lower(x, w).compile().as_text()
  assert "all-gather" in hlo and "dynamic-update-slice(" not in hlo


def test_collectives_combining_six_or_more_arrays_are_counted():
  """XLA writes `/*index=5*/` inside a tuple of six or more results; its '=' once ended the match, so such a
  combined all-reduce went uncounted (MaxText's unrolled 8B step: 12.93 GiB of all-reduces read instead of
  13.98)."""
  from jaxalign import plan
  arrays = ", ".join(["bf16[4096,8,128]{2,0,1}"] * 5) + ", /*index=5*/bf16[4096,8,128]{2,0,1}"
  hlo = (f"  %all-reduce.1 = ({arrays}) all-reduce(%a, %b, %c, %d, %e, /*index=5*/%f), channel_id=1\n"
         "  %all-reduce.2 = bf16[4096,128256]{1,0} all-reduce(%g), channel_id=2\n"
         "  %all-gather-start.3 = (bf16[64,128]{1,0}, bf16[4096,128]{1,0}) all-gather-start(%h)\n")
  got = plan.collective_bytes(hlo)
  assert got["all-reduce"] == 6 * 4096 * 8 * 128 * 2 + 4096 * 128256 * 2
  assert got["all-gather"] == 4096 * 128 * 2  # An async start's operand is not counted as moved.
  assert plan.collective_counts(hlo) == {"all-reduce": 2, "all-gather": 1}


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
  # The peak is libtpu's own (its heap's peak with the arguments), never above arguments + temporaries.
  assert row["argument_bytes"] < row["peak_bytes"] <= row["sum_bytes"]
  assert row["step_seconds"] > 0 and 0 < row["mfu"] < 1
  assert row["collectives"].get("all-gather", 0) + row["collectives"].get("all-reduce", 0) > 0  # FSDP over 4.
  assert "fits" in out.stdout and "train_step: peak" in out.stdout
  # attention='auto' on a TPU mesh is the Pallas splash kernel (a tpu_custom_call in the compiled HLO); the
  # vocabulary-tiled LM head, through the fused SFT head (a shard_map with its reduce-scatter), compiles too.
  assert row["attention"].startswith("pallas")


def _plan(model_dir, scan=True, step_time="extrapolated", **overrides):
  """compile_plan of a tiny SFT step for v5p-8 in-process, at the TPU's default matmul precision (the test
  session's 'highest' would ask Mosaic kernels for float32 contractions of bfloat16 operands)."""
  import jax

  from jaxalign import plan
  from tests.conftest import load_config
  cfg = load_config("sft", "tiny", mesh__data=1, mesh__fsdp=-1, model__init=str(model_dir), train__seq_len=256,
                    train__batch_size=8, model__dtype="bfloat16", model__scan_layers=scan, **overrides)
  with jax.default_matmul_precision("default"):
    return plan.compile_plan(cfg, "v5p-8", extrapolate=scan, step_time=step_time)


def _whole_model_seconds(model_dir, layers, **overrides) -> float:
  """Cost-model seconds of the whole model's step unrolled, priced as the plan prices its cut models."""
  import jax

  from jaxalign import plan
  from tests.conftest import load_config
  cfg = load_config("sft", "tiny", mesh__data=1, mesh__fsdp=-1, model__init=str(model_dir), train__seq_len=256,
                    train__batch_size=8, model__dtype="bfloat16", **overrides)
  mesh = plan.make_mesh(cfg, topology.parse("v5p-8"))
  with jax.default_matmul_precision("default"):
    return plan._program_times(cfg, mesh, ["layer"] * layers, True)["train_step"][0]


@pytest.mark.slow(45)
def test_plan_of_a_mixture_of_experts_model_over_an_expert_axis(tmp_path):
  """A Qwen3-MoE-shaped model for v5p-8 with its experts over a 2-way expert axis: params and moments split
  over expert x fsdp, the compiled step runs megablox grouped matmuls and splash attention, and the step time
  from cut models agrees with the whole model's, unrolled and priced the same way (expert matmuls as a
  balanced batched matmul: the cost model cannot price megablox)."""
  pytest.importorskip("libtpu")
  import transformers
  transformers.Qwen3MoeConfig(vocab_size=512, hidden_size=128, intermediate_size=256, moe_intermediate_size=128,
                              num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2, head_dim=32,
                              num_experts=8, num_experts_per_tok=2, norm_topk_prob=True).save_pretrained(tmp_path)
  out = _plan(tmp_path, mesh__expert=2)
  assert out["mesh"]["expert"] == 2 and out["mesh"]["fsdp"] == 2
  assert out["params_bytes_per_device"] < 0.3 * 4 * out["params_total"]
  row = out["programs"]["train_step"]
  assert row["fits"] and row["kernels"]["gmm"] >= 3 and row["kernels"]["tgmm"] >= 3
  assert any(k.startswith("splash_mha_fwd") for k in row["kernels"])
  assert "balanced batched matmul" in row["step_seconds_from"] and 0 < row["mfu"] < 1
  whole = _whole_model_seconds(tmp_path, 3, mesh__expert=2)
  assert row["step_seconds"] == pytest.approx(whole, rel=0.05)


@pytest.mark.slow(50)
def test_plan_of_a_model_mixing_sliding_and_global_layers(tmp_path):
  """Gemma 3's sliding and global layers are priced by kind: the first layer, then each kind's margin times
  its count, near the plan's own --step_time=unrolled (the whole model compiled unrolled)."""
  pytest.importorskip("libtpu")
  import transformers
  transformers.Gemma3TextConfig(vocab_size=512, hidden_size=128, intermediate_size=256, num_hidden_layers=3,
                                num_attention_heads=4, num_key_value_heads=2, head_dim=32, sliding_window=64,
                                layer_types=["sliding_attention", "sliding_attention", "full_attention"],
                                query_pre_attn_scalar=32).save_pretrained(tmp_path)
  row = _plan(tmp_path)["programs"]["train_step"]
  assert "1 x" in row["step_seconds_from"] and "(sliding_attention)" in row["step_seconds_from"]
  assert "(full_attention)" in row["step_seconds_from"]
  whole = _plan(tmp_path, step_time="unrolled")["programs"]["train_step"]
  assert whole["step_seconds_from"] == "the whole model unrolled (3 layers)"
  assert row["step_seconds"] == pytest.approx(whole["step_seconds"], rel=0.15)
  assert sum(whole["collective_bytes_per_step"].values()) > 0 and 0 < whole["mfu"] < 1
  with warnings.catch_warnings(record=True) as seen:  # The same program a third time: no unloadable cache entry.
    warnings.simplefilter("always")
    bare = _plan(tmp_path, step_time="none")["programs"]["train_step"]  # Memory only: no scanned-once time.
  assert "step_seconds" not in bare and "mfu" not in bare and bare["fits"]
  assert not [w for w in seen if "persistent compilation cache" in str(w.message)], [str(w.message) for w in seen]
