"""sft_step properties: packing == padding, exact gradient accumulation, freezing, NaN guard."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxalign.data import batching
from jaxalign.data.examples import Example
from jaxalign.models import transformer as T
from jaxalign.models.config import preset
from jaxalign.optim import make_optimizer
from jaxalign.steps import sft
from jaxalign.steps.state import create
from tests.conftest import load_config

CFG = preset("tiny")


def _examples(n=8, seed=0):
  rng = np.random.default_rng(seed)
  out = []
  for _ in range(n):
    length = int(rng.integers(5, 14))
    trained = np.zeros(length, bool)
    trained[int(rng.integers(1, length - 1)):] = True
    out.append(Example(rng.integers(1, 256, length).astype(np.int32), trained))
  return out


def _params():
  return {"model": T.init_params(CFG, jax.random.key(0))}


@pytest.mark.parametrize("jit", [False, True])
def test_packed_loss_equals_padded(jit):
  exs = _examples(6)
  padded = batching.stack_rows([batching.build_row([e], 16) for e in exs])
  rows = batching.pack_rows([len(e) for e in exs], range(6), 32)
  packed = batching.stack_rows([batching.build_row([exs[i] for i in r], 32) for r in rows])
  assert len(rows) < 6
  f = lambda p, b: sft.sft_loss(p, b, model_cfg=CFG)  # noqa: E731
  f = jax.jit(f) if jit else f
  params = _params()
  (a, (na, _)), (b, (nb, _)) = f(params, padded), f(params, packed)
  assert float(na) == float(nb) == sum(e.trained[1:].sum() for e in exs)
  np.testing.assert_allclose(float(a / na), float(b / nb), rtol=0, atol=1e-5)


def _prompted(n=16, seed=0, length=32):
  """Examples whose first trained target lies at column >= 9 (prompts of 10-20 tokens)."""
  rng = np.random.default_rng(seed)
  out = []
  for _ in range(n):
    p, c = int(rng.integers(10, 20)), int(rng.integers(2, 10))
    trained = np.r_[np.zeros(p, bool), np.ones(c, bool)]
    out.append(Example(rng.integers(1, 256, p + c).astype(np.int32), trained))
  return out


def test_loss_window_batches_keep_every_target_and_give_the_same_loss_and_gradient():
  exs = _prompted()
  full = batching.BatchIterator(exs, batch_size=4, seq_len=32, seed=0, pack=False)
  cut = batching.BatchIterator(exs, batch_size=4, seq_len=32, seed=0, pack=False, window_parts=4)
  grad = jax.jit(jax.grad(lambda p, b: sft.sft_loss(p, b, model_cfg=CFG)[0]))
  loss = jax.jit(lambda p, b: sft.sft_loss(p, b, model_cfg=CFG))
  params, widths = _params(), set()
  for _ in range(cut.batches_per_epoch()):
    a, b = next(full), next(cut)
    w = b["targets"].shape[1]
    widths.add(w)
    assert w % 8 == 0 and b["tokens"].shape == a["tokens"].shape == (4, 32)
    np.testing.assert_array_equal(b["weights"], a["weights"][:, 32 - w:])
    np.testing.assert_array_equal(b["targets"], a["targets"][:, 32 - w:])
    assert b["weights"].sum() == a["weights"].sum() > 0  # Nothing trained was cut.
    (la, (na, _)), (lb, (nb, _)) = loss(params, a), loss(params, b)
    assert float(na) == float(nb)
    np.testing.assert_allclose(float(lb), float(la), rtol=1e-5)
    jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, rtol=1e-4, atol=1e-6), grad(params, a),
                 grad(params, b))
  assert min(widths) < 32  # The prompts were cut for real.
  assert batching.loss_window(9, 32, 4) == 24 and batching.loss_window(32, 32, 4) == 8
  assert batching.loss_window(3, 32, 4) == 32 and batching.loss_window(9, 32, 0) == 32
  ev = batching.eval_batches(exs, batch_size=4, seq_len=32, window_parts=4)
  assert all(b["weights"].sum() > 0 and b["targets"].shape[1] < 32 for b in ev)
  with pytest.raises(AssertionError, match="drop trained targets"):
    batching.cut_window(a, 8)


def test_weights_only_on_trained_targets():
  exs = _examples(4)
  rows = batching.pack_rows([len(e) for e in exs], range(4), 64)
  b = batching.build_row([exs[i] for i in rows[0]], 64)
  at = 0
  for i in rows[0]:
    e = exs[i]
    n = len(e)
    np.testing.assert_array_equal(b["weights"][at:at + n - 1], e.trained[1:])
    assert b["weights"][at + n - 1] == 0  # Never predict across a segment boundary.
    at += n
  assert not b["weights"][at:].any()


def _opt(**kw):
  c = load_config("sft", "tiny")
  ocfg = c.optimizer
  kw = {"warmup_steps": 0, **kw}  # lr 0 at step 0 would make every comparison trivially true.
  with ocfg.unlocked():
    for k, v in kw.items():
      ocfg[k] = v
  return ocfg


def test_grad_accumulation_is_exact():
  exs = _examples(8, seed=3)
  batch = {k: jnp.asarray(v) for k, v in batching.stack_rows([batching.build_row([e], 16) for e in exs]).items()}
  params = _params()
  # SGD with lr 1: the update is the accumulated gradient itself (Adam's first step, ~lr*sign(g), would
  # amplify float rounding of near-zero gradients and test nothing about accumulation).
  tx, sched = make_optimizer(_opt(name="sgd", learning_rate=1.0, schedule="constant", clip_norm=0.0), params, 10)
  outs = []
  for n in (1, 4):
    step = jax.jit(functools.partial(sft.sft_step, model_cfg=CFG, tx=tx, schedule=sched, grad_accum=n))
    st, m = step(create(params, tx, 0), batch)
    outs.append((st.params, float(m["loss"]), float(m["grad_norm"])))
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-5, rtol=0), outs[0][0], outs[1][0])
  moved = np.abs(np.asarray(outs[0][0]["model"]["embed"] - params["model"]["embed"])).max()
  assert moved > 1e-4  # The update is real, so agreeing to 1e-5 means something.
  assert abs(outs[0][1] - outs[1][1]) < 1e-5 and abs(outs[0][2] - outs[1][2]) < 1e-4


def test_freeze_embeddings_and_lower_layers():
  exs = _examples(8)
  batch = {k: jnp.asarray(v) for k, v in batching.stack_rows([batching.build_row([e], 16) for e in exs]).items()}
  params = _params()
  tx, _ = make_optimizer(_opt(freeze=("embed", "layers:0-0"), weight_decay=0.1), params, 10)
  st, _ = jax.jit(functools.partial(sft.sft_step, model_cfg=CFG, tx=tx))(create(params, tx, 0), batch)
  new, old = st.params["model"], params["model"]
  np.testing.assert_array_equal(new["embed"], old["embed"])
  np.testing.assert_array_equal(new["layers"]["wq"][0], old["layers"]["wq"][0])
  assert np.abs(np.asarray(new["layers"]["wq"][1] - old["layers"]["wq"][1])).max() > 0
  assert np.abs(np.asarray(new["lm_head"] - old["lm_head"])).max() > 0
  with pytest.raises(ValueError, match="match no parameter"):
    make_optimizer(_opt(freeze=("embedding",)), params, 10)


def test_nonfinite_update_is_skipped_on_device():
  exs = _examples(8)
  batch = {k: jnp.asarray(v) for k, v in batching.stack_rows([batching.build_row([e], 16) for e in exs]).items()}
  params = _params()
  params["model"]["lm_head"] = params["model"]["lm_head"].at[0, 0].set(jnp.nan)
  tx, _ = make_optimizer(_opt(), params, 10)
  st, m = jax.jit(functools.partial(sft.sft_step, model_cfg=CFG, tx=tx))(create(params, tx, 0), batch)
  assert int(m["nonfinite"]) == 1 and int(st.skipped) == 1 and int(st.step) == 1
  np.testing.assert_array_equal(st.params["model"]["embed"], params["model"]["embed"])
