"""What PPO and GRPO share: the rollout type, the policy's log-probs (with one prompt pass per group), value
and reward-model passes, and the epochs x minibatches scan of an update.

Shapes: B rollout rows (B = prompts x G in GRPO, rows i * G + j sharing prompt i), P prompt columns
(left-padded), N response columns, S = P + N.
"""

from __future__ import annotations

from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp

from jaxalign import sampling, sharding
from jaxalign.models import heads, transformer
from jaxalign.steps.state import TrainState


class Rollout(NamedTuple):
  """One batch of sampled responses and everything an update reads; PPO fills the value fields, GRPO leaves
  them None (and `ref_logp_BN` is None without a reference model)."""

  tokens_BS: jax.Array  # Prompt + response tokens.
  positions_BS: jax.Array
  segment_ids_BS: jax.Array
  mask_BN: jax.Array  # Response tokens (1 up to and including the stop token).
  old_logp_BN: jax.Array  # Sampling policy's log-probs (zeros when the update runs on-policy; see grpo.on_policy).
  ref_logp_BN: jax.Array | None
  scores_B: jax.Array  # Reward-model score of each response (0 without a reward model).
  finished_B: jax.Array  # bool: the response ended with a stop token.
  values_BN: jax.Array | None = None  # PPO: V(state before each response token).
  advantages_BN: jax.Array | None = None  # PPO: GAE.
  returns_BN: jax.Array | None = None  # PPO: value targets.

  @property
  def prompt_len(self) -> int:
    return self.tokens_BS.shape[1] - self.mask_BN.shape[1]


def response_logprobs(cfg, params, tokens_BS, positions_BS, segment_ids_BS, prompt_len: int, temperature: float,
                      with_entropy: bool = False, group: int = 1):
  """Log-probs [B, N] (and entropy) of the response tokens under logits / temperature, through the
  vocabulary-tiled LM head (no [B, N, V] logits for large vocabularies).

  `group` > 1: rows come in groups of that many responses to one prompt (GRPO's layout), and the prompt is
  run once per group (`shared_prefix_hidden`)."""
  targets_BN = tokens_BS[:, prompt_len:]
  if group > 1:
    model = transformer.bind(cfg, params)
    one_row = grouped_row_length(cfg, tokens_BS.shape[1], prompt_len, group)
    hidden = grouped_hidden if one_row else shared_prefix_hidden
    h_BND = hidden(cfg, params, tokens_BS, positions_BS, segment_ids_BS, prompt_len, group)
    lp_BN, ent_BN = model.token_logprobs(h_BND, targets_BN, temperature)
  else:
    lp_BN, ent_BN = transformer.token_logprobs(cfg, params, tokens_BS, positions_BS, segment_ids_BS, targets_BN,
                                               at=slice(prompt_len - 1, tokens_BS.shape[1] - 1),
                                               temperature=temperature)
  return (lp_BN, ent_BN) if with_entropy else lp_BN


def grouped_row_length(cfg, s: int, prompt_len: int, group: int) -> int:
  """The length of a group as one row (prompt + group x response) when `grouped_hidden` applies (splash
  attention in use for that length, no sliding windows), else 0."""
  t = prompt_len + group * (s - prompt_len)
  return t if transformer.use_splash(cfg, t) and not any(cfg.window_sizes()) else 0


def grouped_hidden(cfg, params, tokens_BS, positions_BS, segment_ids_BS, prompt_len: int, group: int):
  """As `shared_prefix_hidden`, with each group as one row [prompt, response 1, ..., response G] under
  splash attention's SharedPrefixMask: the prompt runs once and no KV cache exists, so nothing is copied
  to the G responses (the cache path's repeated cache is G x the prompt's keys and values per layer, and
  its scores are dense [N, S] per row). Exact against it (tests/models/test_splash.py)."""
  bg, s = tokens_BS.shape
  b, p, n = bg // group, prompt_len, s - prompt_len

  def pack(x):  # [B, S] -> [b, P + G N]: the group's prompt once, then its responses.
    return jnp.concatenate([x[:, :p].reshape(b, group, p)[:, 0], x[:, p:].reshape(b, group * n)], axis=1)

  model = transformer.bind(cfg, params)
  h, _ = model.hidden_states(pack(tokens_BS), pack(positions_BS), pack(segment_ids_BS),
                             shared_prefix=(p, n, group))
  d = h.shape[-1]
  last_bD = h[:, p - 1]  # Predicts each response's first token.
  resp_bGnD = h[:, p:].reshape(b, group, n, d)[:, :, :n - 1]
  first_bG1D = jnp.broadcast_to(last_bD[:, None, None], (b, group, 1, d))
  return jnp.concatenate([first_bG1D, resp_bGnD], axis=2).reshape(bg, n, d)


def shared_prefix_hidden(cfg, params, tokens_BS, positions_BS, segment_ids_BS, prompt_len: int, group: int):
  """Final hidden states [B, N, D] predicting the response tokens, where each run of `group` rows shares its
  prompt.

  The prompt goes through the model once per group, into a KV cache; the cache is repeated `group` times and
  the responses attend to it. Exact (the same states as a full forward of every row); the gradient reaches
  the prompt's keys and values summed over its group. It saves (group - 1) / group of the prompt's compute
  in the reference, old-policy and training passes.

  The responses run whole, last token included (its state predicts nothing and is dropped), into a cache of
  all S slots: one token more per row, for attention shapes of the sequence's own lengths (S = 128 keys and
  2 x 64 queries per KV head rather than 127 and 126), which XLA:CPU's kernels run 1.05-1.06x faster over the
  whole pass (2-core Xeon, the bench's GRPO shapes, forward and gradient paired in one process)."""
  bg, s = tokens_BS.shape
  b, p = bg // group, prompt_len
  first = lambda x: x[:, :p].reshape(b, group, p)[:, 0]  # noqa: E731 - the group's prompt (identical rows).
  model = transformer.bind(cfg, params)
  cache = transformer.init_cache(cfg, b, s)
  h_bPD, cache = model.hidden_states(first(tokens_BS), first(positions_BS), first(segment_ids_BS), cache)
  resp_BnD, _ = model.hidden_states(tokens_BS[:, p:], positions_BS[:, p:], segment_ids_BS[:, p:],
                                    transformer.repeat_cache(cache, group))
  return jnp.concatenate([jnp.repeat(h_bPD[:, -1:], group, axis=0), resp_BnD[:, :-1]], axis=1)


def response_values(cfg, params, tokens_BS, positions_BS, segment_ids_BS, prompt_len: int):
  """V(state before each response token) [B, N]; `params` = {'model', 'head'}."""
  v_BS = heads.token_values(cfg, params["model"], params["head"], tokens_BS, positions_BS, segment_ids_BS)
  return v_BS[:, prompt_len - 1:-1]


def score_sequences(cfg, reward_params, tokens_BS, positions_BS, segment_ids_BS):
  """The reward model's scalar score [B] of each whole sequence; `reward_params` = {'model', 'head'}."""
  return heads.sequence_scores(cfg, reward_params["model"], reward_params["head"], tokens_BS, positions_BS,
                               segment_ids_BS)


def sample(cfg, params, prompts_BP, prompt_mask_BP, rng, rollout_cfg, *, stop_ids, pad_id, num_samples: int = 1):
  """Responses to the prompts (`num_samples` per prompt from one prefill): (sample, tokens, positions, segments)
  with the prompts repeated to match."""
  s = sampling.generate(cfg, params, prompts_BP, prompt_mask_BP, rng, max_new_tokens=rollout_cfg.max_new_tokens,
                        temperature=rollout_cfg.temperature, top_k=rollout_cfg.top_k, top_p=rollout_cfg.top_p,
                        stop_ids=stop_ids, pad_id=pad_id, num_samples=num_samples)
  if num_samples > 1:
    prompts_BP = jnp.repeat(prompts_BP, num_samples, axis=0)
    prompt_mask_BP = jnp.repeat(prompt_mask_BP, num_samples, axis=0)
  return (s, *sampling.sequences(prompts_BP, prompt_mask_BP, s))


def frozen_passes(cfg, frozen, seqs, after, prompt_len: int, temperature: float, group: int = 1):
  """Reference log-probs [B, N] (None without a reference) and reward-model scores [B] (zeros without one).

  Each model's pass waits for the previous one (`sharding.after`): one collective order on every device."""
  frozen = frozen or {}
  ref_BN = None
  if "reference" in frozen:
    ref_BN = response_logprobs(cfg, frozen["reference"], *sharding.after(seqs, after), prompt_len, temperature,
                               group=group)
    after = ref_BN
  if "reward" in frozen:
    scores_B = score_sequences(cfg, frozen["reward"], *sharding.after(seqs, after))
  else:
    scores_B = jnp.zeros(seqs[0].shape[0], jnp.float32)
  return ref_BN, scores_B


def minibatch_epochs(update: Callable, carry, data, rng, *, epochs: int, minibatches: int, group: int = 1,
                     what: str = "rollout rows"):
  """`epochs` passes over `data` (a pytree of [B, ...] arrays) in `minibatches` shuffled minibatches, each
  one `update(carry, minibatch) -> (carry, metrics)`, as nested scans. With `group` > 1 the shuffle moves whole
  groups of consecutive rows (GRPO's prompt groups stay together). Metrics: floats averaged over every
  minibatch, int32 flags as their max."""
  rows = jax.tree.leaves(data)[0].shape[0]
  if rows % minibatches or (group > 1 and (rows // group) % minibatches):
    raise ValueError(f"{rows} {what} are not divisible into {minibatches} minibatches"
                     + (f" of whole groups of {group}" if group > 1 else ""))

  def epoch(c, key):
    if group > 1:
      perm = (jax.random.permutation(key, rows // group)[:, None] * group + jnp.arange(group)).reshape(-1)
    else:
      perm = jax.random.permutation(key, rows)
    mbs = jax.tree.map(lambda x: x[perm].reshape((minibatches, rows // minibatches) + x.shape[1:]), data)
    return jax.lax.scan(update, c, mbs)

  carry, ms = jax.lax.scan(epoch, carry, jax.random.split(rng, epochs))
  return carry, jax.tree.map(lambda x: x.mean() if x.dtype != jnp.int32 else x.max(), ms)


def iteration_key(state: TrainState) -> jax.Array:
  """The iteration's key: the run's key folded with the iteration number (the run's key never changes, so
  iteration i draws the same numbers however the run was interrupted and resumed)."""
  return jax.random.fold_in(state.rng, state.step)


def finish_iteration(state: TrainState, params, opt_state, inner: list[TrainState], extra=None) -> TrainState:
  """The outer state after one iteration: `step` + 1, skipped updates of the inner loops added."""
  skipped = state.skipped + sum(s.skipped for s in inner)
  return state._replace(step=state.step + 1, params=params, opt_state=opt_state, skipped=skipped,
                        extra=state.extra if extra is None else extra)
