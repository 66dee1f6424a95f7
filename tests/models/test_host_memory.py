"""Loading an HF checkpoint holds about one per-layer tensor on the host, and equals the plain whole-array load."""

import json
import os
import tracemalloc

import numpy as np
import pytest

from jaxalign import paths, sharding
from jaxalign.models import build, hf, transformer
from jaxalign.models.config import ModelConfig

# Eight layers whose MLP weights dominate: 8.4 MB per layer tensor in float32, 67 MB per stacked MLP param,
# 205 MB in all (on disk, float32): the whole model is ~25x the bound, one stacked param 8x.
BIG = ModelConfig(family="llama", vocab_size=256, hidden_size=512, intermediate_size=4096, num_layers=8,
                  num_heads=2, num_kv_heads=1, head_dim=64)


def _hf_shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
  d, f, q, kv = cfg.hidden_size, cfg.intermediate_size, cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim
  out = {"model.embed_tokens.weight": (cfg.vocab_size, d), "model.norm.weight": (d,),
         "lm_head.weight": (cfg.vocab_size, d)}
  for i in range(cfg.num_layers):
    p = f"model.layers.{i}."
    out.update({p + "input_layernorm.weight": (d,), p + "post_attention_layernorm.weight": (d,),
                p + "self_attn.q_proj.weight": (q, d), p + "self_attn.k_proj.weight": (kv, d),
                p + "self_attn.v_proj.weight": (kv, d), p + "self_attn.o_proj.weight": (d, q),
                p + "mlp.gate_proj.weight": (f, d), p + "mlp.up_proj.weight": (f, d),
                p + "mlp.down_proj.weight": (d, f)})
  return out


def _write_random(cfg: ModelConfig, path: str):
  """A random-weight float32 HF checkpoint in two index-sharded files (one tensor generated at a time)."""
  rng = np.random.default_rng(0)
  names = list(_hf_shapes(cfg).items())
  files = {"model-00001-of-00002.safetensors": names[:len(names) // 2],
           "model-00002-of-00002.safetensors": names[len(names) // 2:]}
  for fn, part in files.items():
    hf.write_safetensors(os.path.join(path, fn), {n: rng.standard_normal(s, np.float32) for n, s in part})
  with open(os.path.join(path, "model.safetensors.index.json"), "w") as f:
    json.dump({"metadata": {}, "weight_map": {n: fn for fn, part in files.items() for n, _ in part}}, f)
  hf.config_to_hf(cfg).save_pretrained(path)


def _reference(path: str, cfg: ModelConfig) -> dict:
  """The straightforward load (each stacked param built whole on the host): what `load_params` must equal."""
  st = hf.SafetensorsDir(path)
  layer_map = hf._layer_map(cfg)
  out = {}
  for ours, names in hf.hf_names(cfg).items():
    if ours[0] == "layers":
      out[ours] = np.stack([np.asarray(layer_map[ours[1]][1](st.get(n)), np.float32) for n in names])
    else:
      w = np.asarray(st.get(names[0]), np.float32)
      out[ours] = w.T if ours == ("lm_head",) else w
  return out


def _assert_equal_to_reference(params, ref: dict, shardings=None):
  flat = dict(hf._flat(params))
  flat_shardings = dict(hf._flat(shardings)) if shardings is not None else {}
  assert set(flat) == set(ref)
  for k, want in ref.items():
    np.testing.assert_array_equal(np.asarray(flat[k]), want, err_msg=str(k))
    if k in flat_shardings:
      assert flat[k].sharding == flat_shardings[k], k


def test_load_holds_about_one_layer_tensor_on_the_host(tmp_path):
  """Peak traced host memory of an 8-device fsdp load stays under 2x the largest per-layer tensor, plus the
  params loaded whole (small ones), which on the CPU backend may *be* device memory.

  What tracemalloc sees: numpy registers its buffers with it, so every slice the loader reads is counted; the
  memory map of the safetensors file is not (file-backed pages, not allocations). Device buffers that XLA
  allocates are not traced either: the chunked params are written in place into such a buffer
  (`jnp.zeros` + a donated dynamic_update_slice), so they vanish from the count once their piece is placed.
  But the CPU backend may adopt an aligned numpy buffer as the device buffer itself (zero copy, checked here:
  ~8 MB of the small whole-loaded params stay traced after the load, and go when the params do): those bytes
  are device memory on an accelerator, so the bound adds them. Measured: peak ~20 MB (bound 8.4 MB, whole-loaded
  params 7.4 MB); the reference load, building each stacked param whole (67 MB) and keeping them, 210 MB."""
  path = str(tmp_path / "big")
  os.makedirs(path)
  _write_random(BIG, path)
  bound = hf.max_layer_bytes(BIG, np.float32)
  assert bound == BIG.hidden_size * BIG.intermediate_size * 4
  shardings = build.param_shardings(BIG, sharding.make_mesh(fsdp=8))
  shapes = {k: v.shape for k, v in hf._flat(transformer.abstract_params(BIG)[0])}
  flat_shardings = dict(hf._flat(shardings))
  whole = sum(int(np.prod(s)) * 4 for k, s in shapes.items()
              if hf.piece_rows(s, flat_shardings[k], np.float32, bound)[0] is None)
  assert whole < bound  # Small next to the bound, so the assertion below is about the pieces.

  tracemalloc.start()
  try:
    tracemalloc.reset_peak()
    start = tracemalloc.get_traced_memory()[0]
    params = hf.load_params(path, BIG, shardings)
    peak = tracemalloc.get_traced_memory()[1] - start
    tracemalloc.reset_peak()
    ref = _reference(path, BIG)
    ref_peak = tracemalloc.get_traced_memory()[1] - start
  finally:
    tracemalloc.stop()
  assert peak < 2 * bound + whole, (peak, bound, whole)
  assert ref_peak > 8 * bound > 3 * peak  # The test has teeth: one whole stacked param alone is far above it.
  _assert_equal_to_reference(params, ref, shardings)


@pytest.mark.parametrize("family", ["llama", "qwen2"])
@pytest.mark.parametrize("mesh", [None, {"fsdp": 8}, {"fsdp": 4, "tensor": 2}, {"data": 2, "fsdp": 2, "tensor": 2}])
def test_piecewise_load_equals_whole_array_load(hf_factory, family, mesh):
  """Bit for bit, for every layout: pieces along an axis no device splits (layers, vocab rows), or whole."""
  path = hf_factory(family)
  cfg = hf.config_from_hf(path)
  shardings = None if mesh is None else build.param_shardings(cfg, sharding.make_mesh(**mesh))
  _assert_equal_to_reference(hf.load_params(path, cfg, shardings), _reference(path, cfg), shardings)


def test_bucket_load_reads_ranges_and_equals_local_load(hf_factory):
  """From gs:// (ranged reads of one layer tensor, or of an embedding's rows, at a time): the same params."""
  from tests import gcs

  path = hf_factory("llama")
  cfg = hf.config_from_hf(path)
  shardings = build.param_shardings(cfg, sharding.make_mesh(fsdp=4, tensor=2))
  with gcs.emulator("bucket"):
    paths.upload(path, "gs://bucket/hm/llama")
    params = hf.load_params("gs://bucket/hm/llama", cfg, shardings)
  _assert_equal_to_reference(params, _reference(path, cfg), shardings)


def test_sequence_classification_checkpoint_loads_score_head_and_no_lm_head(hf_factory):
  """A *ForSequenceClassification checkpoint: zero LM head (it has none), the score head exact, sharded or not."""
  path = hf_factory("llama", seq_cls=True)
  cfg = hf.config_from_hf(path)
  mesh = sharding.make_mesh(fsdp=8)
  want = np.asarray(hf.SafetensorsDir(path).get("score.weight"))[0]
  for shardings, head_sharding in [(None, None), (build.param_shardings(cfg, mesh), build.head_shardings(cfg, mesh))]:
    params = hf.load_params(path, cfg, shardings)
    np.testing.assert_array_equal(np.asarray(params["lm_head"]), np.zeros((cfg.hidden_size, cfg.vocab_size)))
    np.testing.assert_array_equal(np.asarray(hf.load_score_head(path, cfg, head_sharding)["w"]), want)
