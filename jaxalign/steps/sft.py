"""Supervised fine-tuning: token-weighted next-token cross-entropy.

    step = functools.partial(sft_step, model_cfg=cfg, tx=tx)
    state, metrics = jax.jit(step, donate_argnums=0)(state, batch)

`batch` holds tokens, positions, segment_ids [B, T] and targets, weights [B, W] for the last W <= T
positions (see jaxalign.data.batching): log-probs are computed only there, through the vocabulary-tiled LM
head (`transformer.token_logprobs`: no [B, T, V] logits for large vocabularies).
"""

from __future__ import annotations

import jax.numpy as jnp

from jaxalign.models import moe, transformer
from jaxalign.steps.state import TrainState, accumulate, apply_update


def sft_loss(params, batch, *, model_cfg, fused: bool = True):
  """(sum of token NLL, (trained-token count, {})): the caller divides once over all microbatches.

  `fused`: for a large vocabulary the head's gradients are made in the forward (three head matmuls, not
  four: transformer.weighted_logprob_sum); evaluation, which takes no gradient, passes False."""
  w_BW = batch["weights"].astype(jnp.float32)
  args = (model_cfg, params["model"], batch["tokens"], batch["positions"], batch["segment_ids"], batch["targets"])
  with moe.collect() as router:
    if fused:
      lp_sum = transformer.weighted_logprob_sum(*args, w_BW)
    else:
      lp_sum = jnp.sum(transformer.token_logprobs(*args)[0] * w_BW)
  n = jnp.sum(w_BW)
  nll, sums = moe.add_router_loss(model_cfg, router, -lp_sum, n)
  return nll, (n, sums)


def sft_step(state: TrainState, batch: dict, *, model_cfg, tx, schedule=None, grad_accum: int = 1,
             loss_spike: float = 0.0):
  """One optimizer step over the global batch; returns (state, metrics)."""
  grads, metrics = accumulate(lambda p, b: sft_loss(p, b, model_cfg=model_cfg), state.params, batch, grad_accum)
  metrics["tokens"] = metrics.pop("denominator")
  return apply_update(state, grads, metrics, tx, schedule, loss_spike)


def sft_eval(state: TrainState, batch, *, model_cfg):
  """Sums for an exact eval mean over many batches: {'loss_sum', 'tokens'}."""
  nll, (n, _) = sft_loss(state.params, batch, model_cfg=model_cfg, fused=False)
  return {"loss_sum": nll, "tokens": n}
