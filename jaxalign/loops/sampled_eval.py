"""Evaluation by sampling: the policy answers held-out prompts; the reward model, reward functions and KL to
the reference score the answers. PPO's and GRPO's in-training eval and the evaluate stage."""

from __future__ import annotations

import dataclasses
import json
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxalign import paths, sharding
from jaxalign.data import batching
from jaxalign.data.prompts import left_pad, stop_ids
from jaxalign.metrics import fetch
from jaxalign.rewards import functions as reward_functions
from jaxalign.steps import policy


@dataclasses.dataclass
class SampledEval:
  """`run(params)` samples every eval prompt (the last batch padded, never dropped) and scores the answers."""

  config: Any
  tok: Any
  model_cfg: Any
  mesh: Any
  prompts: list
  frozen: dict
  rollout: Any  # Sampler settings (loops.ppo.rollout_settings).
  functions: list
  batch_size: int  # Prompts per sampling batch (global).

  def __post_init__(self):
    r = self.rollout
    cfg, stops, pad = self.model_cfg, stop_ids(self.tok), self.tok.pad_token_id
    self.k = int(self.config.eval.get("samples_per_prompt", 1))

    def fn(params, frozen, batch, key):
      s, *seqs = policy.sample(cfg, params, batch["prompts"], batch["prompt_mask"], key, r, stop_ids=stops,
                               pad_id=pad, num_samples=self.k)
      p = batch["prompts"].shape[1]
      lp_BN = policy.response_logprobs(cfg, params, *seqs, p, r.temperature)
      ref_BN, scores_B = policy.frozen_passes(cfg, frozen, tuple(seqs), lp_BN, p, r.temperature)
      out = {"tokens": s.tokens, "mask": s.mask, "finished": s.finished}
      if ref_BN is not None:
        out["kl"] = jnp.sum((lp_BN - ref_BN) * s.mask, -1)  # Per response (nats), as everywhere.
      if "reward" in frozen:
        out["score"] = scores_B
      return out

    # Outputs replicated: every process sees every row (small), so metrics agree across processes.
    self._fn = jax.jit(fn, out_shardings=sharding.replicated(self.mesh))
    self.episodes = None
    if self.config.get("env") and self.config.env.name:  # Multi-turn: the same episodes as in training.
      from jaxalign.loops.episodes import Episodes
      self.episodes = Episodes(cfg, r, self.config.env, self.tok, self.mesh, stop_ids=stops, pad_id=pad,
                               group=self.k, policy_logprobs=True)

      def summary(ro, env_rewards):
        p = ro.tokens_BS.shape[1] - ro.mask_BN.shape[1]
        out = {"tokens": ro.tokens_BS[:, p:], "mask": ro.segment_ids_BS[:, p:], "finished": ro.finished_B,
               "env": env_rewards, "response_length": ro.mask_BN.sum(-1)}
        if ro.ref_logp_BN is not None:
          out["kl"] = jnp.sum((ro.old_logp_BN - ro.ref_logp_BN) * ro.mask_BN, -1)
        if "reward" in (self.frozen or {}):
          out["score"] = ro.scores_B
        return out

      self._summary = jax.jit(summary, out_shardings=sharding.replicated(self.mesh))

  def _episodes(self, params, frozen, batch, chunk, key) -> dict:
    """One batch of eval episodes, every row on every process (this process ran its own rows' episodes)."""
    local = [chunk[i] for i in range(len(chunk))[batching.host_rows(len(chunk))]]
    ro, env_rewards, _ = self.episodes.run(params, frozen, batch["prompts"], batch["prompt_mask"], local, key)
    return self._summary(ro, env_rewards)

  def run(self, params, frozen=None, progress: str = "") -> tuple[dict, list[dict]]:
    """(metric means, one row per prompt: prompt, completion and its scores); `frozen` defaults to the models
    given at construction (in training, pass the state's: a donated step hands its frozen models on)."""
    frozen = self.frozen if frozen is None else frozen
    b = self.batch_size
    key = jax.random.PRNGKey(self.config.seed + 991)
    n = len(self.prompts)
    if self.config.eval.max_batches:
      n = min(n, self.config.eval.max_batches * b)
    agg: dict[str, list] = {}
    rows = []
    bar = None
    if progress and self.config.logging.progress and jax.process_index() == 0:  # Rate and ETA (tqdm).
      from tqdm import tqdm
      bar = tqdm(total=n, desc=progress, unit="prompt", mininterval=2.0)
    for s in range(0, n, b):
      chunk = self.prompts[s:min(s + b, n)]
      real = len(chunk)
      chunk = chunk + [chunk[-1]] * (b - real)  # A short last batch is padded; the padding is dropped below.
      toks, mask = left_pad([e.ids for e in chunk], self.rollout.prompt_len, self.tok.pad_token_id)
      sl = batching.host_rows(b)
      bs = sharding.batch_sharding(self.mesh)
      batch = {"prompts": jax.make_array_from_process_local_data(bs, toks[sl]),
               "prompt_mask": jax.make_array_from_process_local_data(bs, mask[sl])}
      kk = self.k  # Samples per prompt: rows i * kk + j.
      k_s = jax.random.fold_in(key, s)
      raw = self._fn(params, frozen, batch, k_s) if self.episodes is None else \
          self._episodes(params, frozen, batch, chunk, k_s)
      out = {k: v[:real * kk] for k, v in fetch(raw).items()}
      comps = reward_functions.decode(self.tok, out["tokens"], out["mask"])  # With episodes: observations too.
      prompts, columns = reward_functions.expand(chunk[:real], kk)  # As in training: records as written.
      texts = [p if isinstance(p, str) else str(p) for p in prompts]
      timeout = self.config.reward.get("timeout_s")
      scores = {f"reward/{name}": reward_functions.values([(name, f, w)], prompts, comps, columns, timeout)[:, 0]
                for name, f, w in self.functions}
      if self.episodes is not None:
        scores["reward/env"] = out["env"]
      for k in ("kl", "score"):
        if k in out:
          scores[k] = out[k]
      scores["response_length"] = out.get("response_length", out["mask"].sum(-1))  # Policy tokens.
      scores["no_eos_fraction"] = 1 - out["finished"]
      for k, v in scores.items():  # Over all samples: mean@k when kk > 1.
        agg.setdefault(k, []).extend(map(float, v))
      if kk > 1:  # pass@k: a prompt passes when any of its k samples reaches eval.pass_threshold.
        for name in [n for n, _, _ in self.functions] + (["env"] if self.episodes is not None else []):
          v = np.asarray(scores[f"reward/{name}"], np.float64).reshape(real, kk)
          hit = np.where(np.isnan(v), -np.inf, v) >= self.config.eval.get("pass_threshold", 1.0)
          ok = np.where(np.isnan(v).all(-1), np.nan, hit.any(-1))
          agg.setdefault(f"pass@{kk}/{name}", []).extend(map(float, ok))
      for i, (p, c) in enumerate(zip(texts, comps)):
        rows.append({"prompt": p, "completion": c, **({"sample": i % kk} if kk > 1 else {}),
                     **{k: float(v[i]) for k, v in scores.items()}})
      if bar is not None:
        bar.update(real)
    if bar is not None:
      bar.close()
    return summarize(agg), rows

  def evaluate_fn(self, samples_path: str):
    """The driver's `evaluate(state, step, final)`: the final eval also writes its samples (JSONL)."""
    def evaluate(state, step, final):
      del step
      metrics, rows = self.run(state.params["model"], state.frozen or {})
      if final:
        write_jsonl(samples_path, rows)
      return metrics
    return evaluate


def summarize(values: dict[str, list]) -> dict[str, float]:
  """The mean of each per-prompt metric and its standard error (`<name>_se`: sample std / sqrt(n)), so two
  evaluations can be told apart from sampling noise (0 with a single prompt)."""
  out = {}
  for k, v in values.items():
    x = np.asarray(v, np.float64)
    x = x[np.isfinite(x)] if np.isfinite(x).any() else x  # A function's None (NaN): not applicable there.
    out[k] = float(x.mean())
    out[f"{k}_se"] = float(x.std(ddof=1) / np.sqrt(len(x))) if len(x) > 1 else 0.0
  return out


def write_jsonl(path: str, rows: list[dict]):
  """Rows as JSONL, written whole by the primary process (one object upload in a bucket)."""
  if jax.process_index() == 0:
    paths.write_text(path, "".join(json.dumps(r) + "\n" for r in rows))
