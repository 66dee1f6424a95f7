"""The DPO family (sigmoid/cDPO, IPO, hinge, robust, SimPO, ORPO) and KTO, as pure steps.

Policy params are `state.params['model']`; the frozen reference is `state.frozen['reference']`, or the batch
carries precomputed `ref_logps` [B, 2] (then no reference is held at all). Chosen and rejected go through
one forward of 2B rows.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jaxalign import sharding
from jaxalign.losses import preference
from jaxalign.models import moe, transformer
from jaxalign.steps.state import TrainState, accumulate, apply_update

REFERENCE_FREE = ("simpo", "orpo")


def response_logps(model_cfg, params, batch, use_lora: bool = True):
  """(sum of response-token log-probs [B, 2], response token counts [B, 2]). Targets and weights may cover
  only the last W of the T columns (`data.loss_window`): logits are computed there only."""
  b = batch["tokens"].shape[0]
  flat = lambda k: batch[k].reshape(2 * b, batch[k].shape[-1])  # noqa: E731
  lp_BT, _ = transformer.token_logprobs(model_cfg, params, flat("tokens"), flat("positions"), flat("segment_ids"),
                                        flat("targets"), use_lora=use_lora)
  lp_BT = lp_BT * flat("weights")
  return lp_BT.sum(-1).reshape(b, 2), flat("weights").sum(-1).reshape(b, 2)


def reference_logps(model_cfg, frozen, batch, params=None, after=None):
  """Precomputed (batch['ref_logps']), a frozen reference, or, for LoRA, the policy with adapters off.

  `after` (the policy's log-probs) orders the reference forward after the policy's: see `sharding.after`.
  """
  if "ref_logps" in batch:
    return batch["ref_logps"]
  batch = sharding.after(batch, after)
  if frozen and "reference" in frozen:
    return jax.lax.stop_gradient(response_logps(model_cfg.replace(lora_rank=0), frozen["reference"], batch)[0])
  if model_cfg.lora_rank:
    return jax.lax.stop_gradient(response_logps(model_cfg, params, batch, use_lora=False)[0])
  raise ValueError("DPO needs reference log-probs: a frozen reference, precomputed ref_logps, or LoRA")


def dpo_loss(params, batch, frozen, *, model_cfg, loss_cfg):
  with moe.collect() as router:  # The policy's router loss only (not the reference's).
    lp, n = response_logps(model_cfg, params["model"], batch)
  n = jnp.maximum(n, 1.0)
  mean = lp / n
  if loss_cfg.type in REFERENCE_FREE:
    ref = jnp.zeros_like(lp)
  else:
    ref = reference_logps(model_cfg, frozen, batch, params["model"], after=lp)
  valid = batch["valid"]
  # ORPO's NLL as TRL computes it: one token mean over the batch's chosen completions (each pair's summed NLL
  # over the batch's chosen-token count, times the pair count the caller divides by).
  nll_chosen = -lp[:, 0] * jnp.sum(valid) / jnp.maximum(jnp.sum(n[:, 0] * valid), 1.0)
  average = loss_cfg.type == "ipo" and loss_cfg.get("ipo_average", True)
  losses, rew_c, rew_r = preference.preference_loss(
      loss_cfg.type, pc=lp[:, 0], pr=lp[:, 1], rc=ref[:, 0], rr=ref[:, 1], pc_mean=mean[:, 0], pr_mean=mean[:, 1],
      nll_chosen=nll_chosen, beta=loss_cfg.beta, label_smoothing=loss_cfg.label_smoothing,
      simpo_gamma=loss_cfg.simpo_gamma, orpo_lambda=loss_cfg.orpo_lambda,
      n_chosen=n[:, 0] if average else None, n_rejected=n[:, 1] if average else None)
  s = lambda x: jnp.sum(x * valid)  # noqa: E731
  sums = {"rewards/chosen": s(rew_c), "rewards/rejected": s(rew_r), "rewards/margins": s(rew_c - rew_r),
          "rewards/accuracies": s((rew_c > rew_r).astype(jnp.float32)), "logps/chosen": s(lp[:, 0]),
          "logps/rejected": s(lp[:, 1])}
  loss, extra = moe.add_router_loss(model_cfg, router, s(losses), jnp.sum(valid))
  return loss, (jnp.sum(valid), sums | extra)


def dpo_step(state: TrainState, batch, *, model_cfg, loss_cfg, tx, schedule=None, grad_accum: int = 1,
             loss_spike: float = 0.0):
  fn = lambda p, b: dpo_loss(p, b, state.frozen, model_cfg=model_cfg, loss_cfg=loss_cfg)  # noqa: E731
  grads, m = accumulate(fn, state.params, batch, grad_accum)
  m["pairs"] = m.pop("denominator")
  return apply_update(state, grads, m, tx, schedule, loss_spike)


def dpo_eval(state: TrainState, batch, *, model_cfg, loss_cfg):
  loss, (n, sums) = dpo_loss(state.params, batch, state.frozen, model_cfg=model_cfg, loss_cfg=loss_cfg)
  return {"loss": loss, "pairs": n, **sums}


def dpo_eval_metrics(s: dict) -> dict:
  n = max(float(s["pairs"]), 1.0)
  return {k: float(v) / n for k, v in s.items() if k != "pairs"} | {"pairs": n}


# ----------------------------------------------------------------------------------------------- KTO

def kto_loss(params, batch, frozen, *, model_cfg, loss_cfg):
  """`batch`: tokens.. [B, 2, T] with row 0 the completion and row 1 a mismatched (prompt_i, completion_j)
  for the KL baseline; label [B] (1 = desirable); valid [B]."""
  with moe.collect() as router:
    lp, _ = response_logps(model_cfg, params["model"], batch)
  ref = reference_logps(model_cfg, frozen, batch, params["model"], after=lp)
  valid = batch["valid"]
  kl = jax.lax.stop_gradient(jnp.maximum(jnp.sum((lp[:, 1] - ref[:, 1]) * valid) / jnp.maximum(valid.sum(), 1), 0.0))
  losses, rew = preference.kto(lp[:, 0], ref[:, 0], batch["label"] > 0, kl, loss_cfg.beta,
                               loss_cfg.desirable_weight, loss_cfg.undesirable_weight)
  d = batch["label"] * valid
  u = (1 - batch["label"]) * valid
  sums = {"rewards/desirable": jnp.sum(rew * d), "rewards/undesirable": jnp.sum(rew * u),
          "count/desirable": jnp.sum(d), "count/undesirable": jnp.sum(u), "kl": kl * jnp.sum(valid)}
  loss, extra = moe.add_router_loss(model_cfg, router, jnp.sum(losses * valid), jnp.sum(valid))
  return loss, (jnp.sum(valid), sums | extra)


def kto_step(state: TrainState, batch, *, model_cfg, loss_cfg, tx, schedule=None, grad_accum: int = 1,
             loss_spike: float = 0.0):
  fn = lambda p, b: kto_loss(p, b, state.frozen, model_cfg=model_cfg, loss_cfg=loss_cfg)  # noqa: E731
  grads, m = accumulate(fn, state.params, batch, grad_accum)
  m["examples"] = m.pop("denominator")
  return apply_update(state, grads, m, tx, schedule, loss_spike)


def kto_eval(state: TrainState, batch, *, model_cfg, loss_cfg):
  loss, (n, sums) = kto_loss(state.params, batch, state.frozen, model_cfg=model_cfg, loss_cfg=loss_cfg)
  return {"loss": loss, "pairs": n, **sums}
