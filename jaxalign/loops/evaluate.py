"""Evaluation as a stage: sample a policy on held-out prompts; score with a reward model and/or reward
functions; KL to a reference; win rate against another checkpoint (the reward model, or a function, as judge).
Writes WORKDIR/samples.jsonl and WORKDIR/eval.json, and the usual metrics.jsonl row.
"""

from __future__ import annotations

import json
import os

import jax
import numpy as np

from jaxalign.loops import online, setup
from jaxalign.loops.offline import prepare
from jaxalign.metrics import MetricWriter


def _judge(texts_a, texts_b, key: str) -> float:
  """Win rate of a over b on the same prompts by `key` (ties count half)."""
  a = np.asarray([t[key] for t in texts_a])
  b = np.asarray([t[key] for t in texts_b])
  return float(np.mean((a > b) + 0.5 * (a == b)))


def evaluate(config, workdir: str) -> dict:
  mesh, tok, model_cfg, params, source = prepare(config, workdir)
  prompts, _, _ = online.prompt_examples(_eval_only(config), tok)
  frozen, sources = online._frozen_models(config, model_cfg, mesh, need_reference=bool(  # noqa: SLF001
      config.reference.init or config.model.init))
  sources["model"] = source
  functions = online.load_reward_functions(config.reward.eval_functions, ())
  ev = online.Evaluator(config, tok, model_cfg, mesh, prompts, frozen, functions)
  writer = MetricWriter(workdir, "evaluate", config.logging.tensorboard)
  metrics, texts = ev(params["model"], 0, None, os.path.join(workdir, "samples.jsonl"))
  if config.compare.init:
    other, _ = setup.load_model(config.compare.init, model_cfg, mesh, jax.random.PRNGKey(0), key="compare.init")
    _, base_texts = ev(other["model"], 0)
    judge = config.compare.judge or ("score" if "reward" in frozen else "")
    if not judge and functions:
      judge = f"reward/{functions[0][0]}"
    if judge:
      metrics["win_rate"] = _judge(texts, base_texts, judge)
      metrics["win_rate_judge"] = judge
  writer.write(0, "eval", {k: v for k, v in metrics.items() if not isinstance(v, str)})
  writer.close()
  if jax.process_index() == 0:
    with open(os.path.join(workdir, "eval.json"), "w") as f:
      json.dump({"metrics": metrics, "sources": sources}, f, indent=2)
  return metrics


def _eval_only(config):
  """Prompts come from data.eval (or data.train when no eval file is given), all of them."""
  c = config.copy_and_resolve_references()
  with c.unlocked():
    if c.data.eval:
      c.data.train, c.data.eval = c.data.eval, ""
    c.data.eval_fraction = 0.0
  return c
