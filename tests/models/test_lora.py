"""LoRA: adapters start as the identity, only they train, the reference is the base with adapters off,
and the merged export loads in transformers with matching logits."""

import functools
import os

import jax
import jax.numpy as jnp
import numpy as np
import torch

from jaxalign import sharding
from jaxalign.data import batching
from jaxalign.data.examples import Example, PairExample
from jaxalign.models import build, hf, lora, transformer as T
from jaxalign.models.config import preset
from jaxalign.optim import make_optimizer
from jaxalign.steps import dpo
from jaxalign.steps.state import create
from tests.conftest import load_config
from tests import hf_models

CFG = preset("tiny", lora_rank=4, lora_targets=("wq", "wk", "wv", "wo", "w_gate", "w_up", "w_down"))


def _pairs(n=8, seed=0):
  rng = np.random.default_rng(seed)
  out = []
  for _ in range(n):
    p = rng.integers(1, 256, 4)
    mk = lambda: Example(np.concatenate([p, rng.integers(1, 256, 5)]).astype(np.int32),  # noqa: E731
                         np.array([0] * 4 + [1] * 5, bool))
    out.append(PairExample(mk(), mk()))
  return batching.pair_batch(out, 16)


def test_lora_dpo_trains_only_adapters_with_base_as_reference():
  mesh = sharding.make_mesh(data=1, fsdp=-1, tensor=1)
  base = build.init_sharded(CFG.replace(lora_rank=0), mesh, jax.random.key(0))
  params = {"model": build.add_adapters(CFG, base, mesh, jax.random.key(1))}
  tok = jnp.arange(16).reshape(2, 8)
  np.testing.assert_array_equal(T.forward(CFG, params["model"], tok)[0],
                                T.forward(CFG.replace(lora_rank=0), base, tok)[0])  # B = 0 at init.
  ocfg = load_config("dpo", "tiny").optimizer
  tx, _ = make_optimizer(ocfg, params, 10)
  state = create(params, tx, 0)  # No frozen reference: the base with adapters off is the reference.
  opt_leaves = sum(x.size for x in jax.tree.leaves(state.opt_state))
  n_lora, n_all = lora.count(params)
  assert 0 < n_lora < n_all / 5 and opt_leaves <= 2 * n_lora + 10  # Optimizer state is adapter-sized.
  step = jax.jit(functools.partial(dpo.dpo_step, model_cfg=CFG, loss_cfg=load_config("dpo").loss, tx=tx))
  b = {k: jnp.asarray(v) for k, v in _pairs().items()}
  for _ in range(3):
    state, m = step(state, b)
  new = state.params["model"]
  for k, v in new["layers"].items():
    changed = bool(np.abs(np.asarray(v - params["model"]["layers"][k])).max() > 0)
    assert changed == lora.is_adapter(k), k
  np.testing.assert_array_equal(new["embed"], params["model"]["embed"])
  assert float(m["rewards/margins"]) != 0.0  # The reference (adapters off) differs from the trained policy.


def test_merged_export_loads_in_transformers(tmp_path):
  params = T.init_params(CFG, jax.random.key(0))
  params["layers"] = {k: (v + 0.05 if k.startswith("lora_b") else v) for k, v in params["layers"].items()}
  merged = lora.merge(CFG, params)
  base_cfg = CFG.replace(lora_rank=0)
  hf.save_params(str(tmp_path), base_cfg, merged)
  tok = np.random.default_rng(0).integers(0, 256, (2, 10))
  with torch.no_grad():
    ref = hf_models.load(str(tmp_path))(input_ids=torch.tensor(tok)).logits.numpy()
  ours = np.asarray(T.forward(CFG, params, jnp.asarray(tok))[0])
  assert np.abs(ours - ref).max() <= 1e-4
  assert not os.path.exists(str(tmp_path / "adapter_config.json"))


def test_saving_lora_params_merges_the_adapters(tmp_path):
  """hf.save_params given adapted params writes the merged model (it used to write the base and drop the
  adapters without a word)."""
  params = T.init_params(CFG, jax.random.key(0))
  params["layers"] = {k: (v + 0.05 if k.startswith("lora_b") else v) for k, v in params["layers"].items()}
  hf.save_params(str(tmp_path), CFG, params)
  tok = np.random.default_rng(1).integers(0, 256, (2, 10))
  with torch.no_grad():
    ref = hf_models.load(str(tmp_path))(input_ids=torch.tensor(tok)).logits.numpy()
  ours = np.asarray(T.forward(CFG, params, jnp.asarray(tok))[0])
  base = np.asarray(T.forward(CFG, params, jnp.asarray(tok), use_lora=False)[0])
  assert np.abs(ours - ref).max() <= 1e-4 < np.abs(base - ref).max()
