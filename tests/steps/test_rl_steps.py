"""Online-RL step pieces: the shared-prefix forward equals a full forward of every row."""

import jax
import jax.numpy as jnp
import numpy as np

from jaxalign import sampling
from jaxalign.models import transformer as T
from jaxalign.models.config import preset
from jaxalign.steps import policy

CFG = preset("tiny")


def _group_rollout(g=3):
  """Left-padded ragged prompts, G sampled responses each (some ended early: padded after EOS)."""
  params = T.init_params(CFG, jax.random.key(0))
  rng = np.random.default_rng(0)
  toks, mask = np.zeros((2, 8), np.int32), np.zeros((2, 8), np.int32)
  for i, n in enumerate([5, 8]):
    toks[i, 8 - n:], mask[i, 8 - n:] = rng.integers(3, 256, n), 1
  s = sampling.generate(CFG, params, jnp.asarray(toks), jnp.asarray(mask), jax.random.key(1), max_new_tokens=6,
                        num_samples=g, stop_ids=tuple(range(3, 80)))
  prompts, pmask = jnp.repeat(toks, g, 0), jnp.repeat(mask, g, 0)
  return params, (*sampling.sequences(prompts, pmask, s),), s.mask


def test_shared_prefix_logprobs_and_gradients_equal_the_full_forward():
  params, (tokens, pos, seg), mask = _group_rollout()
  assert float(mask.sum()) < mask.size  # Some responses ended early (padding inside the response).

  def lp(p, group):
    return policy.response_logprobs(CFG, p, tokens, pos, seg, 8, 0.7, group=group) * mask

  full, shared = lp(params, 1), lp(params, 3)
  np.testing.assert_allclose(np.asarray(shared), np.asarray(full), rtol=1e-5, atol=1e-5)
  w = jnp.asarray(np.random.default_rng(1).normal(size=mask.shape), jnp.float32)
  g_full, g_shared = (jax.grad(lambda p: jnp.sum(lp(p, k) * w))(params) for k in (1, 3))
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6), g_full, g_shared)
