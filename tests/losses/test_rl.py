"""GAE, PPO losses, KL estimators and group advantages against plain-numpy references."""

import jax.numpy as jnp
import numpy as np
import pytest

from jaxalign.losses import rl


def _np_gae(r, v, mask, gamma, lam):
  b, n = r.shape
  adv = np.zeros_like(r)
  for i in range(b):
    last = 0.0
    for t in reversed(range(n)):
      if not mask[i, t]:
        continue
      nv = v[i, t + 1] if t + 1 < n and mask[i, t + 1] else 0.0
      delta = r[i, t] + gamma * nv - v[i, t]
      last = delta + gamma * lam * last
      adv[i, t] = last
  return adv, (adv + v) * mask


@pytest.mark.parametrize("gamma,lam", [(1.0, 0.95), (0.99, 1.0), (0.9, 0.0)])
def test_gae_matches_numpy(gamma, lam):
  rng = np.random.default_rng(0)
  r, v = rng.normal(size=(4, 9)), rng.normal(size=(4, 9))
  lens = np.array([9, 5, 1, 7])
  mask = (np.arange(9)[None] < lens[:, None]).astype(np.float64)
  adv, ret = rl.gae(jnp.asarray(r * mask, jnp.float32), jnp.asarray(v * mask, jnp.float32),
                    jnp.asarray(mask, jnp.float32), gamma, lam)
  ref_adv, ref_ret = _np_gae(r * mask, v * mask, mask, gamma, lam)
  np.testing.assert_allclose(adv, ref_adv, atol=1e-5)
  np.testing.assert_allclose(ret, ref_ret, atol=1e-5)


def test_ppo_losses_match_numpy():
  rng = np.random.default_rng(1)
  lp, old, adv = rng.normal(-2, 0.3, (3, 6)), rng.normal(-2, 0.3, (3, 6)), rng.normal(size=(3, 6))
  mask = np.ones((3, 6))
  mask[1, 4:] = 0
  for lo, hi in ((0.2, 0.2), (0.2, 0.28)):
    ratio = np.exp(lp - old)
    ref = np.maximum(-adv * ratio, -adv * np.clip(ratio, 1 - lo, 1 + hi)) * mask
    got, clipped, akl = rl.ppo_policy_loss(*(jnp.asarray(x, jnp.float32) for x in (lp, old, adv, mask)), lo, hi)
    np.testing.assert_allclose(got, ref, atol=1e-5)
    np.testing.assert_allclose(akl, (ratio - 1 - np.log(ratio)) * mask, atol=1e-5)  # k3 of KL(old || new).
  v, ov, ret = rng.normal(size=(3, 6)), rng.normal(size=(3, 6)), rng.normal(size=(3, 6))
  vc = ov + np.clip(v - ov, -0.2, 0.2)
  ref_v = 0.5 * np.maximum((v - ret) ** 2, (vc - ret) ** 2) * mask
  got_v, _ = rl.ppo_value_loss(*(jnp.asarray(x, jnp.float32) for x in (v, ov, ret, mask)), 0.2)
  np.testing.assert_allclose(got_v, ref_v, atol=1e-5)


def test_token_rewards_put_score_on_last_token():
  mask = jnp.asarray([[1, 1, 1, 0], [1, 0, 0, 0]], jnp.float32)
  lp, ref = jnp.full((2, 4), -1.0), jnp.full((2, 4), -1.5)
  r, kl = rl.token_rewards(jnp.asarray([2.0, -1.0]), lp, ref, mask, 0.1)
  np.testing.assert_allclose(r, [[-0.05, -0.05, 1.95, 0], [-1.05, 0, 0, 0]], atol=1e-6)
  np.testing.assert_allclose(kl.sum(-1), [1.5, 0.5], atol=1e-6)


def test_group_advantages():
  r = np.array([1.0, 2.0, 3.0, 4.0, 0.0, 0.0, 1.0, 5.0])
  g = r.reshape(2, 4)
  # TRL GRPOTrainer: (r - mean) / (torch.std(group) + 1e-4), torch.std being the sample std (ddof=1).
  trl = ((g - g.mean(1, keepdims=True)) / (g.std(1, ddof=1, keepdims=True) + 1e-4)).reshape(-1)
  np.testing.assert_allclose(rl.group_advantages(jnp.asarray(r), 4, "grpo", "group"), trl, atol=1e-5)
  pop = ((g - g.mean(1, keepdims=True)) / (g.std(1, keepdims=True) + 1e-6)).reshape(-1)
  np.testing.assert_allclose(rl.group_advantages(jnp.asarray(r), 4, "grpo", "group", eps=1e-6, ddof=0), pop,
                             atol=1e-5)
  batch = (g - g.mean(1, keepdims=True)).reshape(-1) / (r.std(ddof=1) + 1e-4)
  np.testing.assert_allclose(rl.group_advantages(jnp.asarray(r), 4, "grpo", "batch"), batch, atol=1e-5)
  loo = np.array([[x - np.delete(row, i).mean() for i, x in enumerate(row)] for row in g]).reshape(-1)
  np.testing.assert_allclose(rl.group_advantages(jnp.asarray(r), 4, "rloo", "none"), loo, atol=1e-5)
  np.testing.assert_allclose(rl.group_advantages(jnp.asarray(r), 4, "grpo", "none"),
                             (g - g.mean(1, keepdims=True)).reshape(-1), atol=1e-6)


def test_kl_estimators_and_aggregation():
  lp, ref = jnp.asarray([-1.0, -2.0]), jnp.asarray([-1.5, -1.0])
  d = np.array([0.5, -1.0])
  np.testing.assert_allclose(rl.kl_estimate(lp, ref, "k3"), np.exp(-d) - 1 + d, atol=1e-6)
  loss = jnp.asarray([[1.0, 1.0, 0.0], [4.0, 0.0, 0.0]])
  mask = jnp.asarray([[1.0, 1.0, 0.0], [1.0, 0.0, 0.0]])
  assert float(rl.aggregate(loss, mask, "sequence", 3)) == pytest.approx((1.0 + 4.0) / 2)
  assert float(rl.aggregate(loss, mask, "token", 3)) == pytest.approx(6.0 / 3)
  assert float(rl.aggregate(loss, mask, "constant", 3)) == pytest.approx(6.0 / 6)
  assert float(rl.aggregate(loss, mask, "global_token", 3, 12.0)) == pytest.approx(0.5)


def test_overlong_penalty_matches_dapo():
  """DAPO eq. 13 with L_max = 20, L_cache = 5: 0 up to 15 tokens, (15 - L) / 5 up to 20, -1 at the budget."""
  lengths = jnp.asarray([3, 15, 16, 18, 20])
  np.testing.assert_allclose(rl.overlong_penalty(lengths, 20, 5), [0.0, 0.0, -0.2, -0.6, -1.0], atol=1e-6)
  np.testing.assert_allclose(rl.overlong_penalty(lengths, 20, 5, factor=0.5), [0, 0, -0.1, -0.3, -0.5], atol=1e-6)
