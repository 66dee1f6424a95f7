"""Reward model: the decoder with a scalar head, trained with the Bradley-Terry loss on preference pairs.

`batch`: tokens/positions/segment_ids [B, 2, T] (chosen, rejected), margin [B], valid [B].
"""

from __future__ import annotations

import jax.numpy as jnp

from jaxalign.losses.preference import bradley_terry
from jaxalign.models import moe
from jaxalign.models.heads import sequence_scores
from jaxalign.steps.state import TrainState, accumulate, apply_update


def pair_scores(model_cfg, params, batch):
  """Rewards [B, 2] at the last real token of chosen and rejected (one forward over 2B rows)."""
  b, _, t = batch["tokens"].shape
  flat = lambda k: batch[k].reshape(2 * b, t)  # noqa: E731
  r = sequence_scores(model_cfg, params["model"], params["head"], flat("tokens"), flat("positions"),
                      flat("segment_ids"))
  return r.reshape(b, 2)


def reward_loss(params, batch, *, model_cfg, center_coef: float = 0.0, use_margin: bool = True):
  with moe.collect() as router:
    r = pair_scores(model_cfg, params, batch)
  rc, rr = r[:, 0], r[:, 1]
  valid = batch["valid"]
  loss = bradley_terry(rc, rr, batch["margin"] if use_margin else None, center_coef) * valid
  sums = {"accuracy": jnp.sum((rc > rr) * valid), "margin": jnp.sum((rc - rr) * valid),
          "reward_mean": jnp.sum((rc + rr) * valid) / 2, "reward_sq": jnp.sum((rc ** 2 + rr ** 2) * valid) / 2}
  total, extra = moe.add_router_loss(model_cfg, router, jnp.sum(loss), jnp.sum(valid))
  return total, (jnp.sum(valid), sums | extra)


def _finish(m):
  m["reward_std"] = jnp.sqrt(jnp.maximum(m.pop("reward_sq") - m["reward_mean"] ** 2, 0.0))
  m["pairs"] = m.pop("denominator")
  return m


def reward_step(state: TrainState, batch, *, model_cfg, tx, schedule=None, grad_accum: int = 1,
                center_coef: float = 0.0, use_margin: bool = True, loss_spike: float = 0.0):
  fn = lambda p, b: reward_loss(p, b, model_cfg=model_cfg, center_coef=center_coef, use_margin=use_margin)  # noqa
  grads, m = accumulate(fn, state.params, batch, grad_accum)
  return apply_update(state, grads, _finish(m), tx, schedule, loss_spike)


def reward_eval(state: TrainState, batch, *, model_cfg, center_coef: float = 0.0, use_margin: bool = True):
  loss, (n, sums) = reward_loss(state.params, batch, model_cfg=model_cfg, center_coef=center_coef,
                                use_margin=use_margin)
  return {"loss": loss, "pairs": n, **sums}


def reward_eval_metrics(s: dict) -> dict:
  n = max(float(s["pairs"]), 1.0)
  mean = float(s["reward_mean"]) / n
  return {"loss": float(s["loss"]) / n, "accuracy": float(s["accuracy"]) / n, "margin": float(s["margin"]) / n,
          "reward_mean": mean, "reward_std": max(float(s["reward_sq"]) / n - mean ** 2, 0.0) ** 0.5, "pairs": n}
