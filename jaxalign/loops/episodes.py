"""Multi-turn rollouts: policy turns (jitted sampling) and environment turns (host) alternate, up to a turn
limit and a token budget; the result is an ordinary `Rollout` the GRPO update trains on.

Layout (the single-turn layout, so the update, the shared-prompt pass and the KL need nothing new): a row is
the left-padded prompt [P], then the episode [N] (policy turns and observations, in order, right-padded),
N = train.seq_len - rollout.prompt_len being the episode's token budget. `segment_ids` are 1 on every real
token (observations are context); `mask_BN` is 1 on the policy's tokens only, so observations are never in
the loss or the KL. Each policy turn is sampled from the whole episode so far (re-prefilled: the turn
program has one static shape, [rows, P + N] context and `env.turn_tokens` new tokens), and the log-probs it
records are those a forward pass over the finished episode gives (tests/loops/test_episodes.py).

Failure isolation: an environment that raises ends its episode (its reward so far kept; logged, counted in
`env_failures`); an episode that runs out of budget is cut at the budget (`episode_overruns`) and one that
reaches `env.max_turns` ends there (`turn_limit`). None of them stops the run.
"""

from __future__ import annotations

import collections
import logging
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from jaxalign import sampling, sharding
from jaxalign.data.prompts import left_pad
from jaxalign.metrics import local_rows
from jaxalign.rewards import environments
from jaxalign.steps import policy
from jaxalign.steps.policy import Rollout


class Episode:
  """One episode on the host: its tokens after the prompt, which of them the policy wrote, its reward."""

  def __init__(self, prompt_ids: np.ndarray, env):
    self.prompt = [int(t) for t in prompt_ids]
    self.env = env
    self.ids: list[int] = []
    self.policy: list[int] = []  # 1 where the policy wrote the token.
    self.logprobs: list[float] = []
    self.reward, self.turns, self.done, self.ended = 0.0, 0, False, ""


class Stats(NamedTuple):
  turns: float
  env_failures: float
  episode_overruns: float
  turn_limit: float


def observation_ids(tok, obs: str, role: str = "tool", ends: tuple[str, ...] = ()) -> list[int]:
  """An observation's tokens as the chat template writes a `role` message after an assistant turn, with the
  next assistant turn opened (everything after the assistant's end-of-turn token, one of `ends`: sampling
  stops at it); the plain text's tokens for a tokenizer without a chat template (or one refusing the role)."""
  if not obs:
    return []
  if getattr(tok, "chat_template", None):
    base = [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]
    for r in (role, "user"):
      try:
        s0 = tok.apply_chat_template(base, tokenize=False)
        s1 = tok.apply_chat_template(base + [{"role": r, "content": obs}], tokenize=False,
                                     add_generation_prompt=True)
      except Exception:  # Templates that refuse a role (or need tool-call ids): try the next.
        continue
      if s1.startswith(s0):
        # s0 ends after the assistant's end-of-turn token and whatever the template writes after it (often
        # a newline); sampling stops at that token, so its trailing text belongs to the observation.
        cut = max((s0.rfind(e) + len(e) for e in ends if e and e in s0), default=len(s0))
        tail = s0[cut:]
        return tok.encode(tail + s1[len(s0):], add_special_tokens=False)
  return tok.encode(obs, add_special_tokens=False)


class Episodes:
  """`run(params, frozen, prompts, prompt_mask, rows, key)` -> (Rollout, env rewards [B], Stats): episodes for
  `group` rows per prompt (rows i * group + j answer prompt i, as GRPO lays them out)."""

  def __init__(self, cfg, rollout_cfg, env_cfg, tok, mesh, *, stop_ids, pad_id: int, group: int,
               policy_logprobs: bool):
    self.cfg, self.r, self.tok, self.mesh, self.group, self.pad = cfg, rollout_cfg, tok, mesh, group, pad_id
    self.factory = environments.factory(env_cfg.name)
    self.max_turns = int(env_cfg.max_turns)
    self.turn_tokens = int(min(env_cfg.turn_tokens, rollout_cfg.max_new_tokens))
    self.role = env_cfg.get("observation_role", "tool")
    self.ends = tuple(t for t in tok.convert_ids_to_tokens(list(stop_ids)) if t) if tok is not None else ()
    self.failures: collections.Counter = collections.Counter()
    bs, rep = sharding.batch_sharding(mesh), sharding.replicated(mesh)
    p, n = rollout_cfg.prompt_len, rollout_cfg.max_new_tokens

    def turn(params, ctx, ctx_mask, key):
      return sampling.generate(cfg, params, ctx, ctx_mask, key, max_new_tokens=self.turn_tokens,
                               temperature=rollout_cfg.temperature, top_k=rollout_cfg.top_k,
                               top_p=rollout_cfg.top_p, stop_ids=tuple(stop_ids), pad_id=pad_id)

    def score(params, frozen, tokens, seg, mask, finished):
      pos = jnp.maximum(jnp.cumsum(seg, axis=-1) - 1, 0).astype(jnp.int32)
      seqs = (tokens, pos, seg)
      if policy_logprobs:
        old = policy.response_logprobs(cfg, params, *seqs, p, rollout_cfg.temperature, group=group) * mask
      else:  # On-policy GRPO: the update's own forward gives them.
        old = jnp.zeros_like(mask)
      ref, scores = policy.frozen_passes(cfg, frozen, seqs, old, p, rollout_cfg.temperature, group=group)
      return Rollout(*seqs, mask, old, None if ref is None else ref * mask, scores, finished)

    del n
    self._turn = jax.jit(turn, out_shardings=bs)
    self._score = jax.jit(score, out_shardings=bs)
    self._rep = rep

  def _cache_size(self) -> int:
    return self._turn._cache_size() + self._score._cache_size()  # noqa: SLF001

  def run(self, params, frozen, prompts, prompt_mask, rows: list, key):
    p, n = self.r.prompt_len, self.r.max_new_tokens
    g = self.group
    prompts, prompt_mask = local_rows(prompts), local_rows(prompt_mask)
    eps = []
    for i in range(prompts.shape[0] * g):
      row = rows[i // g] if i // g < len(rows) else None
      ep = Episode(prompts[i // g][prompt_mask[i // g] > 0], None)
      record = {"prompt": getattr(row, "text", None), **dict(getattr(row, "columns", {}) or {})}
      self._guarded(ep, lambda: self._start(ep, record))
      eps.append(ep)
    bs = sharding.batch_sharding(self.mesh)
    for t in range(self.max_turns):
      live = [e for e in eps if not e.done]
      if not live:
        break
      ctx, ctx_mask = left_pad([np.asarray(e.prompt + e.ids, np.int32) for e in eps], p + n, self.pad)
      out = self._turn(params, jax.make_array_from_process_local_data(bs, ctx),
                       jax.make_array_from_process_local_data(bs, ctx_mask), jax.random.fold_in(key, t))
      toks, lps, mask = (local_rows(x) for x in (out.tokens, out.logprobs, out.mask))
      for e, tk, lp, m in zip(eps, toks, lps, mask):
        if not e.done:
          self._policy_turn(e, tk[m > 0], lp[m > 0], n)
    for e in eps:
      if not e.done:
        e.done, e.ended = True, "turn_limit"
    tokens = np.full((len(eps), p + n), self.pad, np.int32)
    seg = np.zeros((len(eps), p + n), np.int32)
    mask = np.zeros((len(eps), n), np.float32)
    for i, e in enumerate(eps):
      pr = e.prompt[-p:]
      tokens[i, p - len(pr):p], seg[i, p - len(pr):p] = pr, 1
      tokens[i, p:p + len(e.ids)], seg[i, p:p + len(e.ids)] = e.ids, 1
      mask[i, :len(e.ids)] = e.policy
    finished = np.asarray([e.ended == "env" for e in eps])
    local = lambda x: jax.make_array_from_process_local_data(bs, x)  # noqa: E731
    ro = self._score(params, frozen, local(tokens), local(seg), local(mask), local(finished))
    rewards = local(np.asarray([e.reward for e in eps], np.float32))
    stats = Stats(turns=float(np.mean([e.turns for e in eps])),
                  env_failures=float(sum(e.ended == "error" for e in eps)),
                  episode_overruns=float(np.mean([e.ended == "budget" for e in eps])),
                  turn_limit=float(np.mean([e.ended == "turn_limit" for e in eps])))
    over = sum(e.ended == "budget" for e in eps)
    if over:  # The run goes on; say why these episodes stopped early.
      logging.warning("%d of %d episodes ran past the token budget (train.seq_len - rollout.prompt_len = %d "
                      "tokens after the prompt) and were cut there (metric episode_overruns)", over, len(eps), n)
    self.logprobs = [np.asarray(e.logprobs, np.float32) for e in eps]  # The sampler's, for checks.
    return ro, rewards, stats

  def _start(self, ep: Episode, record: dict):
    ep.env = self.factory()
    obs = ep.env.reset(record)  # Text that continues the prompt, as it is (no chat turn of its own).
    self._append(ep, self.tok.encode(obs, add_special_tokens=False) if obs else [], 0, [], self.r.max_new_tokens)

  def _policy_turn(self, ep: Episode, toks: np.ndarray, lps: np.ndarray, n: int):
    ep.turns += 1
    if not self._append(ep, [int(t) for t in toks], 1, [float(x) for x in lps], n):
      return
    text = self.tok.decode(toks, skip_special_tokens=True)

    def env_turn():
      obs, reward, done = ep.env.step(text)
      ep.reward += float(reward)
      if done:
        ep.done, ep.ended = True, "env"
      elif obs:
        self._append(ep, observation_ids(self.tok, obs, self.role, self.ends), 0, [], n)

    self._guarded(ep, env_turn)

  def _append(self, ep: Episode, ids: list[int], by_policy: int, lps: list[float], n: int) -> bool:
    """Add a turn's tokens; False (the episode ended, cut at the budget) when they do not all fit."""
    room = n - len(ep.ids)
    take = ids[:room]
    ep.ids += take
    ep.policy += [by_policy] * len(take)
    ep.logprobs += lps[:len(take)] if by_policy else []
    if len(ids) > room or (not by_policy and len(ep.ids) >= n):  # No room left for another policy turn.
      ep.done, ep.ended = True, "budget"
      return False
    return True

  def _guarded(self, ep: Episode, fn):
    try:
      fn()
    except Exception as e:  # An environment's bug costs its episode, never the run.
      self.failures[type(e).__name__] += 1
      logging.warning("environment %s raised %s: %s; its episode ends with the reward it had",
                      getattr(self.factory, "__name__", self.factory), type(e).__name__,
                      str(e).splitlines()[0] if str(e) else "")
      ep.done, ep.ended = True, "error"
