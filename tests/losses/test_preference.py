"""Every preference loss against an independent plain-numpy implementation of its published formula."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxalign.losses import preference as P



@pytest.fixture(autouse=True)
def _float64():
  """The formulas are dtype-generic; compare them in float64 so 1e-6 tests the formula, not f32 rounding."""
  jax.config.update("jax_enable_x64", True)
  yield
  jax.config.update("jax_enable_x64", False)


def _np_logsig(x):
  return -np.logaddexp(0.0, -x)


def _inputs(seed=0, n=64):
  rng = np.random.default_rng(seed)
  pc, pr, rc, rr = (rng.normal(-20, 6, n) for _ in range(4))
  lens_c, lens_r = rng.integers(1, 40, n), rng.integers(1, 40, n)
  return pc, pr, rc, rr, lens_c, lens_r


@pytest.mark.parametrize("eps", [0.0, 0.2])
def test_dpo_sigmoid_and_cdpo(eps):
  pc, pr, rc, rr, *_ = _inputs()
  beta = 0.1
  h = (pc - pr) - (rc - rr)
  ref = -(1 - eps) * _np_logsig(beta * h) - eps * _np_logsig(-beta * h)
  got = P.dpo_sigmoid(*map(jnp.asarray, (pc, pr, rc, rr)), beta, eps)
  np.testing.assert_allclose(got, ref, atol=1e-6, rtol=1e-6)


def test_ipo_hinge_robust():
  pc, pr, rc, rr, *_ = _inputs(1)
  beta, eps = 0.5, 0.1
  h = (pc - pr) - (rc - rr)
  args = tuple(map(jnp.asarray, (pc, pr, rc, rr)))
  np.testing.assert_allclose(P.ipo(*args, beta), (h - 1 / (2 * beta)) ** 2, rtol=1e-6, atol=1e-6)
  np.testing.assert_allclose(P.hinge(*args, beta), np.maximum(0, 1 - beta * h), atol=1e-6)
  robust = ((1 - eps) * -_np_logsig(beta * h) - eps * -_np_logsig(-beta * h)) / (1 - 2 * eps)
  np.testing.assert_allclose(P.robust_dpo(*args, beta, eps), robust, rtol=1e-6, atol=1e-6)


def test_simpo_and_orpo():
  pc, pr, _, _, lc, lr = _inputs(2)
  mc, mr = pc / lc / 10, pr / lr / 10  # Mean log-probs in a realistic range (-3, 0).
  beta, gamma, lam = 2.0, 0.5, 0.1
  np.testing.assert_allclose(P.simpo(jnp.asarray(mc), jnp.asarray(mr), beta, gamma),
                             -_np_logsig(beta * (mc - mr) - gamma), rtol=1e-6, atol=1e-6)
  odds = lambda m: m - np.log1p(-np.exp(m))  # noqa: E731  log(p / (1 - p)), p = exp(mean logp).
  ref = -mc - lam * _np_logsig(odds(mc) - odds(mr))
  got, _ = P.orpo(jnp.asarray(mc), jnp.asarray(mr), jnp.asarray(-mc), lam)
  np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-6)


def test_orpo_is_finite_as_logps_approach_zero():
  for x in (-1e-9, -1e-6, -1e-3, -30.0):
    loss, lo = P.orpo(jnp.float32(x), jnp.float32(-1.0), jnp.float32(-x), 0.1)
    g = jax.grad(lambda a: P.orpo(a, jnp.float32(-1.0), -a, 0.1)[0])(jnp.float32(x))
    assert np.isfinite(loss) and np.isfinite(lo) and np.isfinite(g), x


def test_kto():
  rng = np.random.default_rng(3)
  pol, ref = rng.normal(-10, 3, 32), rng.normal(-10, 3, 32)
  lab = rng.random(32) < 0.5
  kl, beta, wd, wu = 0.3, 0.1, 1.0, 1.33
  r = pol - ref
  sig = lambda x: 1 / (1 + np.exp(-x))  # noqa: E731
  ref_loss = np.where(lab, wd * (1 - sig(beta * (r - kl))), wu * (1 - sig(beta * (kl - r))))
  got, rew = P.kto(jnp.asarray(pol), jnp.asarray(ref), jnp.asarray(lab), kl, beta, wd, wu)
  np.testing.assert_allclose(got, ref_loss, rtol=1e-6, atol=1e-6)
  np.testing.assert_allclose(rew, beta * r, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("center", [0.0, 0.01])
def test_bradley_terry(center):
  rng = np.random.default_rng(4)
  a, b, m = rng.normal(0, 2, 32), rng.normal(0, 2, 32), rng.random(32)
  ref = -_np_logsig(a - b - m) + center * (a + b) ** 2
  np.testing.assert_allclose(P.bradley_terry(jnp.asarray(a), jnp.asarray(b), jnp.asarray(m), center), ref,
                             rtol=1e-6, atol=1e-6)


def test_unknown_loss_type():
  z = jnp.zeros(2)
  with pytest.raises(ValueError, match="loss.type='dpoo'"):
    P.preference_loss("dpoo", pc=z, pr=z, rc=z, rr=z, pc_mean=z, pr_mean=z, nll_chosen=z, beta=0.1)


def _tiny_pairs():
  from jaxalign.data import batching
  from jaxalign.data.examples import Example, PairExample
  prompt = np.arange(1, 7, dtype=np.int32)
  ans = lambda ids: Example(np.r_[prompt, ids].astype(np.int32), np.arange(6 + len(ids)) >= 6)  # noqa: E731
  pairs = [PairExample(ans([20, 21, 22, 23]), ans([30])), PairExample(ans([40, 41]), ans([50, 51, 52, 53, 54])),
           PairExample(ans([60]), ans([70, 71]))]
  return batching.pair_batch(pairs + [None], length=16)  # One padding pair (valid 0).


@pytest.mark.parametrize("loss_type", ["ipo", "simpo", "orpo"])
def test_dpo_step_losses_follow_trl_conventions(loss_type):
  """IPO on per-token average log-ratios (TRL DPOTrainer), SimPO with label smoothing (TRL CPOTrainer), ORPO's
  NLL a token mean over the batch's chosen completions (TRL ORPOTrainer): the step's loss equals TRL's formula
  evaluated on the same log-probs."""
  import ml_collections

  from jaxalign.models import transformer
  from jaxalign.models.config import preset
  from jaxalign.steps import dpo

  cfg = preset("tiny")
  params = {"model": transformer.init_params(cfg, jax.random.key(0))}
  ref = transformer.init_params(cfg, jax.random.key(1))
  batch = _tiny_pairs()
  loss_cfg = ml_collections.ConfigDict(dict(type=loss_type, beta=0.3, label_smoothing=0.1, simpo_gamma=0.5,
                                            orpo_lambda=0.2, ipo_average=True))
  total, (count, _) = dpo.dpo_loss(params, batch, {"reference": ref}, model_cfg=cfg, loss_cfg=loss_cfg)
  got = float(total / count)
  lp, n = (np.asarray(x, np.float64) for x in dpo.response_logps(cfg, params["model"], batch))
  rl, _ = (np.asarray(x, np.float64) for x in dpo.response_logps(cfg, ref, batch))
  v = np.asarray(batch["valid"]) > 0
  lp, n, rl = lp[v], n[v], rl[v]
  b, eps = 0.3, 0.1
  logsig = lambda x: -np.logaddexp(0.0, -x)  # noqa: E731
  if loss_type == "ipo":
    delta = (lp[:, 0] - rl[:, 0]) / n[:, 0] - (lp[:, 1] - rl[:, 1]) / n[:, 1]
    want = np.mean((delta - 1 / (2 * b)) ** 2)
  elif loss_type == "simpo":
    logits = (lp[:, 0] / n[:, 0] - lp[:, 1] / n[:, 1]) - 0.5 / b
    want = np.mean(-logsig(b * logits) * (1 - eps) - logsig(-b * logits) * eps)
  else:
    mc, mr = lp[:, 0] / n[:, 0], lp[:, 1] / n[:, 1]
    log_odds = (mc - np.log1p(-np.exp(mc))) - (mr - np.log1p(-np.exp(mr)))
    want = -lp[:, 0].sum() / n[:, 0].sum() - np.mean(0.2 * logsig(log_odds))
  np.testing.assert_allclose(got, want, rtol=1e-5)
