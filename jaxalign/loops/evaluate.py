"""Evaluation as a stage: sample a policy on held-out prompts; score with a reward model and/or reward
functions; KL to a reference; win rate against another checkpoint (the reward model, or a function, as judge).
Writes WORKDIR/samples.jsonl and WORKDIR/eval.json, and the usual metrics.jsonl row.
"""

from __future__ import annotations


import jax
import numpy as np

from jaxalign import paths, sharding
from jaxalign.data import datasets
from jaxalign.data.prompts import pad_id, stop_ids
from jaxalign.loops import driver, setup
from jaxalign.loops.ppo import prompt_spec, rollout_settings
from jaxalign.loops.sampled_eval import SampledEval, write_jsonl
from jaxalign.metrics import MetricWriter
from jaxalign.rewards import functions as reward_functions
from jaxalign.steps import policy


def _judge(texts_a, texts_b, key: str) -> tuple[float, float]:
  """Win rate of a over b on the same prompts by `key` (ties count half), and its standard error over the
  prompts (per-prompt outcomes 1, 0.5, 0: sample std / sqrt(n))."""
  a = np.asarray([t[key] for t in texts_a])
  b = np.asarray([t[key] for t in texts_b])
  wins = (a > b) + 0.5 * (a == b)
  se = float(wins.std(ddof=1) / np.sqrt(len(wins))) if len(wins) > 1 else 0.0
  return float(np.mean(wins)), se


def build(config, workdir: str, *, mesh=None, abstract: bool = False) -> driver.Parts:
  """The policy (as a state without optimizer) and, for a compile plan, the sampler as its one program."""
  mesh, tok, model_cfg, params, source = setup.prepare(config, workdir, mesh=mesh, abstract=abstract)
  frozen, sources = setup.load_frozen(config, model_cfg, mesh, reference=bool(config.reference.init or
                                                                                config.model.init),
                                      reward=bool(config.reward.init), abstract=abstract)
  sources["model"] = source
  ro = rollout_settings(config)
  state = setup.new_state(params, _NoOptimizer(), config.seed, mesh, frozen=frozen, abstract=abstract)
  pad, stops = pad_id(tok, model_cfg), stop_ids(tok, model_cfg)

  def sample(st, batch):
    s, *_ = policy.sample(model_cfg, st.params["model"], batch["prompts"], batch["prompt_mask"], st.rng, ro,
                          stop_ids=stops, pad_id=pad)
    return s.tokens

  sampler = jax.jit(sample, out_shardings=sharding.replicated(mesh))
  parts = driver.Parts("evaluate", state, sampler, None, mesh,
                       programs={"sample": (sampler, (state, prompt_spec(config, mesh, config.eval.batch_size)))})
  if abstract:
    return parts
  prompts, _, _ = datasets.prompt_examples(_eval_only(config), tok, config.rollout.prompt_len)
  functions = reward_functions.load(config.reward.eval_functions)
  parts.evaluate = SampledEval(config, tok, model_cfg, mesh, prompts, frozen, ro, functions, config.eval.batch_size)
  parts.sources = sources
  return parts


def run(config, workdir: str, compile_since: dict | None = None) -> dict:
  """The evaluate stage: one sampled evaluation of model.init (and of compare.init for a win rate)."""
  parts = build(config, workdir)
  with jax.set_mesh(parts.mesh):
    return _run(parts, config, workdir, compile_since)


def _run(parts: driver.Parts, config, workdir: str, compile_since: dict | None = None) -> dict:
  ev: SampledEval = parts.evaluate
  sources = parts.sources
  metrics, texts = ev.run(parts.state.params["model"], progress="evaluate")
  write_jsonl(paths.join(workdir, "samples.jsonl"), texts)
  if config.compare.init:
    other, _ = setup.load_model(config.compare.init, ev.model_cfg, parts.mesh, jax.random.PRNGKey(0),
                                key="compare.init")
    _, base_texts = ev.run(other["model"], progress="evaluate compare.init")
    judge = config.compare.judge or ("score" if "reward" in ev.frozen else "")
    if not judge and ev.functions:
      judge = f"reward/{ev.functions[0][0]}"
    if judge:
      metrics["win_rate"], metrics["win_rate_se"] = _judge(texts, base_texts, judge)
      metrics["win_rate_judge"] = judge
  writer = MetricWriter(workdir, "evaluate", config.logging.tensorboard)
  writer.write(0, "eval", {k: v for k, v in metrics.items() if not isinstance(v, str)})
  writer.write(0, "summary", driver.compile_summary(compile_since))
  writer.close()
  if jax.process_index() == 0:
    paths.write_json(paths.join(workdir, "eval.json"), {"metrics": metrics, "sources": sources}, indent=2)
    if config.logging.report:
      from jaxalign import report

      report.write(workdir, "evaluate")
  return metrics


class _NoOptimizer:
  """Evaluation trains nothing: an empty optimizer state."""

  def init(self, params):
    del params
    return ()


def _eval_only(config):
  """Prompts come from data.eval (or data.train when no eval file is given), all of them."""
  c = config.copy_and_resolve_references()
  with c.unlocked():
    if c.data.eval:
      c.data.train, c.data.eval = c.data.eval, ""
    c.data.eval_fraction = 0.0
  return c
