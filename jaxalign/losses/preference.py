"""Preference losses: Bradley-Terry reward modelling and the DPO family, as pure functions of log-probs.

Inputs are per-pair sums of response-token log-probs (`pc`, `pr`: policy chosen/rejected; `rc`, `rr`:
reference), float32 [B]. Each function returns per-pair losses [B] (the caller takes the mean) and, where it
has one, the implicit reward beta * (policy - reference).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

LOSS_TYPES = ("sigmoid", "ipo", "hinge", "robust", "simpo", "orpo")


def bradley_terry(r_chosen, r_rejected, margin=None, center_coef: float = 0.0):
  """Reward-model loss -log sigmoid(r_c - r_r - margin) (InstructGPT; margin as in Llama 2), plus
  center_coef * (r_c + r_r)^2 (Eisenstein et al. 2023) to keep rewards centred at 0."""
  d = r_chosen - r_rejected
  if margin is not None:
    d = d - margin
  loss = -jax.nn.log_sigmoid(d)
  if center_coef:
    loss = loss + center_coef * (r_chosen + r_rejected) ** 2
  return loss


def dpo_sigmoid(pc, pr, rc, rr, beta: float, label_smoothing: float = 0.0):
  """DPO (Rafailov et al. 2023): -log sigmoid(beta * h), h = (pc - pr) - (rc - rr).
  With label_smoothing eps: conservative DPO (cDPO, Mitchell 2023), labels flipped with probability eps."""
  h = (pc - pr) - (rc - rr)
  return -(1 - label_smoothing) * jax.nn.log_sigmoid(beta * h) - label_smoothing * jax.nn.log_sigmoid(-beta * h)


def ipo(pc, pr, rc, rr, beta: float, n_chosen=None, n_rejected=None):
  """IPO (Azar et al. 2023): (h - 1/(2 beta))^2 with h the log-ratio difference (beta plays tau).

  With the completions' token counts, each log-ratio is a per-token average, TRL's convention (confirmed by
  the IPO authors as the form behind the paper's results: the squared loss no longer grows with length);
  without them, summed sequence log-probs as the paper writes it (`loss.ipo_average=False`)."""
  if n_chosen is not None:
    h = (pc - rc) / jnp.maximum(n_chosen, 1.0) - (pr - rr) / jnp.maximum(n_rejected, 1.0)
  else:
    h = (pc - pr) - (rc - rr)
  return (h - 1.0 / (2.0 * beta)) ** 2


def hinge(pc, pr, rc, rr, beta: float):
  """SLiC-HF hinge (Zhao et al. 2023): max(0, 1 - beta * h)."""
  h = (pc - pr) - (rc - rr)
  return jax.nn.relu(1.0 - beta * h)


def robust_dpo(pc, pr, rc, rr, beta: float, label_smoothing: float):
  """Robust DPO (Chowdhury et al. 2024): unbiased under label-flip rate eps < 1/2."""
  h = (pc - pr) - (rc - rr)
  eps = label_smoothing
  return ((1 - eps) * -jax.nn.log_sigmoid(beta * h) - eps * -jax.nn.log_sigmoid(-beta * h)) / (1 - 2 * eps)


def simpo(pc_mean, pr_mean, beta: float, gamma: float, label_smoothing: float = 0.0):
  """SimPO (Meng et al. 2024), reference-free: -log sigmoid(beta (avg_c - avg_r) - gamma),
  with avg_* the length-normalised log-probs; label smoothing eps as TRL's CPOTrainer applies it (the labels
  flipped with probability eps, as cDPO)."""
  z = beta * (pc_mean - pr_mean) - gamma
  return -(1 - label_smoothing) * jax.nn.log_sigmoid(z) - label_smoothing * jax.nn.log_sigmoid(-z)


def log1mexp(x):
  """log(1 - exp(x)) for x < 0, accurate at both ends (Maechler 2012); the ORPO NaN source elsewhere."""
  x = jnp.minimum(x, -1e-7)
  return jnp.where(x > -0.6931471805599453, jnp.log(-jnp.expm1(x)), jnp.log1p(-jnp.exp(x)))


def orpo(pc_mean, pr_mean, nll_chosen, lam: float):
  """ORPO (Hong et al. 2024): NLL(chosen) + lam * -log sigmoid(log odds_c - log odds_r),
  odds = p / (1 - p) with p the length-normalised sequence probability. Returns (loss, log_odds_ratio)."""
  log_odds = (pc_mean - log1mexp(pc_mean)) - (pr_mean - log1mexp(pr_mean))
  return nll_chosen - lam * jax.nn.log_sigmoid(log_odds), log_odds


def kto(policy_logps, ref_logps, desirable, kl_ref, beta: float, w_desirable: float = 1.0,
        w_undesirable: float = 1.0):
  """KTO (Ethayarajh et al. 2024) on unpaired completions. `kl_ref` is the batch KL baseline z0
  (a detached, clamped >= 0 estimate from mismatched prompt/completion pairs)."""
  r = policy_logps - ref_logps
  loss_d = w_desirable * (1 - jax.nn.sigmoid(beta * (r - kl_ref)))
  loss_u = w_undesirable * (1 - jax.nn.sigmoid(beta * (kl_ref - r)))
  return jnp.where(desirable, loss_d, loss_u), beta * r


def preference_loss(loss_type: str, *, pc, pr, rc, rr, pc_mean, pr_mean, nll_chosen, beta: float,
                    label_smoothing: float = 0.0, simpo_gamma: float = 0.5, orpo_lambda: float = 0.1,
                    n_chosen=None, n_rejected=None):
  """Dispatch by name; returns per-pair losses [B] and the implicit rewards (chosen, rejected).
  `n_chosen`/`n_rejected`: completion token counts, given for IPO's per-token average (see `ipo`)."""
  if loss_type == "sigmoid":
    loss = dpo_sigmoid(pc, pr, rc, rr, beta, label_smoothing)
  elif loss_type == "ipo":
    loss = ipo(pc, pr, rc, rr, beta, n_chosen, n_rejected)
  elif loss_type == "hinge":
    loss = hinge(pc, pr, rc, rr, beta)
  elif loss_type == "robust":
    loss = robust_dpo(pc, pr, rc, rr, beta, label_smoothing)
  elif loss_type == "simpo":
    loss = simpo(pc_mean, pr_mean, beta, simpo_gamma, label_smoothing)
    return loss, beta * pc_mean, beta * pr_mean
  elif loss_type == "orpo":
    loss, _ = orpo(pc_mean, pr_mean, nll_chosen, orpo_lambda)
    return loss, beta * pc_mean, beta * pr_mean
  else:
    raise ValueError(f"loss.type={loss_type!r}: expected one of {LOSS_TYPES}")
  return loss, beta * (pc - rc), beta * (pr - rr)
