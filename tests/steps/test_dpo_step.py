"""DPO step inputs: loss-window pair batches give the same log-probs and gradients as full ones."""

import jax
import numpy as np

from jaxalign.data import batching
from jaxalign.data.examples import Example, PairExample
from jaxalign.models import transformer as T
from jaxalign.models.config import preset
from jaxalign.steps import dpo

CFG = preset("tiny")


def _pairs(n=8, seed=0):
  rng = np.random.default_rng(seed)
  out = []
  for _ in range(n):
    prompt = rng.integers(1, 256, int(rng.integers(12, 20)))
    ex = []
    for _ in range(2):
      c = int(rng.integers(2, 10))
      ex.append(Example(np.r_[prompt, rng.integers(1, 256, c)].astype(np.int32),
                        np.r_[np.zeros(len(prompt), bool), np.ones(c, bool)]))
    out.append(PairExample(*ex))
  return out


def test_loss_window_pairs_give_the_same_logps_and_gradients():
  pairs = _pairs()
  full = batching.PairIterator(pairs, batch_size=4, seq_len=32, seed=0)
  cut = batching.PairIterator(pairs, batch_size=4, seq_len=32, seed=0, window_parts=4)
  params = T.init_params(CFG, jax.random.key(0))
  logps = jax.jit(lambda p, b: dpo.response_logps(CFG, p, b))
  grad = jax.jit(jax.grad(lambda p, b: (dpo.response_logps(CFG, p, b)[0] * np.array([1.0, -1.0])).sum()))
  widths = set()
  for _ in range(cut.batches_per_epoch()):
    a, b = next(full), next(cut)
    widths.add(b["targets"].shape[-1])
    assert b["tokens"].shape == (4, 2, 32)
    (la, na), (lb, nb) = logps(params, a), logps(params, b)
    np.testing.assert_array_equal(np.asarray(na), np.asarray(nb))
    np.testing.assert_allclose(np.asarray(lb), np.asarray(la), rtol=1e-5)
    jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, rtol=1e-4, atol=1e-6), grad(params, a),
                 grad(params, b))
  assert min(widths) < 32
  ev = batching.eval_pair_batches(pairs, batch_size=4, seq_len=32, window_parts=4)
  assert all(e["targets"].shape[-1] < 32 and e["weights"].sum() > 0 for e in ev)
