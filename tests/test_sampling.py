"""Sampler: greedy == repeated full forwards, returned log-probs == forward log-probs, determinism, stops."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxalign import sampling
from jaxalign.losses.lm import token_logprobs
from jaxalign.models import transformer as T
from jaxalign.models.config import preset

CFG = preset("tiny")


def _prompts():
  rng = np.random.default_rng(0)
  lens = [5, 2, 7]
  toks = np.zeros((3, 8), np.int32)
  mask = np.zeros((3, 8), np.int32)
  for i, n in enumerate(lens):
    toks[i, 8 - n:] = rng.integers(3, 256, n)
    mask[i, 8 - n:] = 1
  return jnp.asarray(toks), jnp.asarray(mask), lens


def test_greedy_equals_repeated_full_forward():
  params = T.init_params(CFG, jax.random.key(0))
  toks, mask, lens = _prompts()
  out = sampling.generate(CFG, params, toks, mask, jax.random.key(1), max_new_tokens=6, greedy=True)
  for i, n in enumerate(lens):
    seq = list(np.asarray(toks[i, 8 - n:]))
    for _ in range(6):
      logits = T.forward(CFG, params, jnp.asarray([seq]))[0]
      seq.append(int(jnp.argmax(logits[0, -1])))
    assert list(np.asarray(out.tokens[i])) == seq[n:]


@pytest.mark.parametrize("temperature,top_k,top_p", [(1.0, 0, 1.0), (0.7, 20, 0.9)])
def test_logprobs_match_forward(temperature, top_k, top_p):
  params = T.init_params(CFG, jax.random.key(0))
  toks, mask, _ = _prompts()
  out = sampling.generate(CFG, params, toks, mask, jax.random.key(2), max_new_tokens=10, temperature=temperature,
                          top_k=top_k, top_p=top_p, stop_ids=(5, 6, 7))
  seq, pos, seg = sampling.sequences(toks, mask, out)
  logits = T.forward(CFG, params, seq, pos, seg)[0] / temperature
  lp = token_logprobs(logits[:, 7:-1], seq[:, 8:])
  np.testing.assert_allclose(np.asarray(lp * out.mask), np.asarray(out.logprobs), atol=1e-5)
  again = sampling.generate(CFG, params, toks, mask, jax.random.key(2), max_new_tokens=10, temperature=temperature,
                            top_k=top_k, top_p=top_p, stop_ids=(5, 6, 7))
  np.testing.assert_array_equal(np.asarray(out.tokens), np.asarray(again.tokens))
  other = sampling.generate(CFG, params, toks, mask, jax.random.key(3), max_new_tokens=10, temperature=temperature)
  assert not np.array_equal(np.asarray(out.tokens), np.asarray(other.tokens))


def test_stop_tokens_end_rows():
  params = T.init_params(CFG, jax.random.key(0))
  toks, mask, _ = _prompts()
  out = sampling.generate(CFG, params, toks, mask, jax.random.key(4), max_new_tokens=40, temperature=3.0,
                          stop_ids=tuple(range(0, 256, 4)), pad_id=0)
  m = np.asarray(out.mask)
  for i in range(3):
    n = int(m[i].sum())
    assert (m[i, :n] == 1).all() and (m[i, n:] == 0).all()
    if out.finished[i]:
      assert int(out.tokens[i, n - 1]) % 4 == 0
      assert (np.asarray(out.tokens[i, n:]) == 0).all()


def test_top_k_restricts_support():
  logits = jnp.asarray([[0.0, 1.0, 2.0, 3.0, 4.0]])
  lk = sampling.process_logits(logits, 1.0, 2, 1.0)
  assert np.isfinite(np.asarray(lk)).sum() == 2
  lp = sampling.process_logits(logits, 1.0, 0, 0.5)
  assert np.isfinite(np.asarray(lp)).sum() == 1  # p(4) = 0.64 > 0.5 alone.


def test_num_samples_shares_one_prefill_and_samples_as_repeated_prompts():
  params = T.init_params(CFG, jax.random.key(0))
  toks, mask, _ = _prompts()
  kw = dict(max_new_tokens=6, temperature=1.0)
  shared = sampling.generate(CFG, params, toks, mask, jax.random.key(3), num_samples=4, **kw)
  rep = sampling.generate(CFG, params, jnp.repeat(toks, 4, 0), jnp.repeat(mask, 4, 0), jax.random.key(3), **kw)
  assert shared.tokens.shape == (12, 6)
  np.testing.assert_array_equal(np.asarray(shared.tokens), np.asarray(rep.tokens))
  np.testing.assert_allclose(np.asarray(shared.logprobs), np.asarray(rep.logprobs), rtol=1e-5, atol=1e-5)
  np.testing.assert_array_equal(np.asarray(shared.mask), np.asarray(rep.mask))
  # The G samples of one prompt are different draws, not copies.
  assert len({tuple(np.asarray(shared.tokens[j])) for j in range(4)}) > 1


def test_sample_categorical_matches_the_distribution_and_never_draws_masked_tokens():
  logits = jnp.log(jnp.asarray([[0.1, 0.2, 0.3, 0.4, 0.0], [0.0, 0.0, 1.0, 0.0, 0.0]]))
  draw = jax.jit(jax.vmap(lambda k: sampling.sample_categorical(k, logits)))
  s = np.asarray(draw(jax.random.split(jax.random.key(0), 40000)))
  freq = np.bincount(s[:, 0], minlength=5) / len(s)
  np.testing.assert_allclose(freq, [0.1, 0.2, 0.3, 0.4, 0.0], atol=0.01)
  assert freq[4] == 0 and (s[:, 1] == 2).all()
