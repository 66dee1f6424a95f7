"""Verifiable rewards: built-in verifiers on known cases, and reward functions that read the record's columns
see the right row's values, with the record's own prompt, in training and in evaluation (issue 20)."""

import json
import os

import numpy as np
import pytest

from jaxalign.rewards import functions, verifiers

COMPLETIONS = ["so the answer is 42.", r"$\boxed{\frac{1}{2}}$", "<answer> Paris </answer>", "no idea",
               "#### 1,234", "<answer>x"]
ANSWERS = ["42", "0.5", "paris", "7", "1234", "3"]


def test_verifiers_on_known_cases():
  assert verifiers.exact_answer(None, COMPLETIONS, answer=ANSWERS) == [1.0, 0.0, 1.0, 0.0, 0.0, 0.0]
  assert verifiers.numeric_answer(None, COMPLETIONS, answer=ANSWERS) == [1.0, 0.0, 0.0, 0.0, 1.0, 0.0]
  assert verifiers.math_answer(None, COMPLETIONS, answer=ANSWERS) == [1.0, 1.0, 0.0, 0.0, 1.0, 0.0]
  assert verifiers.answer_format(None, COMPLETIONS) == [0.0, 1.0, 1.0, 0.0, 0.0, 0.0]
  assert verifiers.final_answer("first <answer>1</answer> then <answer>2</answer>") == "2"
  assert verifiers.exact_answer(None, ["a", "b"], answer=["a", None]) == [1.0, None]  # No reference: None.


def test_values_pass_only_the_columns_a_function_takes_and_none_is_nan():
  seen = {}

  def named(prompts, completions, answer):
    seen["named"] = answer
    return [1.0 if c == a else None for c, a in zip(completions, answer)]

  def plain(prompts, completions):
    return [0.5] * len(completions)

  def kw(prompts, completions, **cols):
    seen["kw"] = sorted(cols)
    return [2.0] * len(completions)

  fns = [("named", named, 1.0), ("plain", plain, 1.0), ("kw", kw, 1.0)]
  v = functions.values(fns, ["p", "q"], ["x", "y"], {"answer": ["x", "z"], "tests": [1, 2]})
  assert seen == {"named": ["x", "z"], "kw": ["answer", "tests"]}
  np.testing.assert_array_equal(v[:, 0], [1.0, np.nan])
  np.testing.assert_array_equal(v[:, 1:], [[0.5, 2.0], [0.5, 2.0]])


CALLS = []


def answer_matches_prompt(prompts, completions, answer, **_):
  """The answer column of each row is its prompt reversed: record whether every row arrived with its own."""
  CALLS.append([a == p[::-1] for p, a in zip(prompts, answer)])
  return [float(len(c) % 2) for c in completions]


def test_a_column_reading_reward_sees_its_own_row_in_training_and_evaluation(tiny, tmp_path):
  from jaxalign.data.tasks import reviews  # noqa: F401  (the tiny tokenizer's words)
  from jaxalign.loops import stages
  from tests.conftest import load_config
  from tests import fixtures

  rows = [{"prompt": r["prompt"], "answer": r["prompt"][::-1], "id": i}
          for i, r in enumerate(fixtures.prompt_completion_rows(64))]
  train = fixtures.write_jsonl(str(tmp_path / "train.jsonl"), rows[:48])
  evals = fixtures.write_jsonl(str(tmp_path / "eval.jsonl"), rows[48:])
  CALLS.clear()
  cfg = load_config("grpo", "tiny", model__init=tiny["model"], data__train=train, data__eval=evals,
                    reward__functions=("tests.rewards.test_verifiers:answer_matches_prompt",), train__steps=2,
                    eval__every=1, eval__max_batches=1, checkpoint__every=100, logging__progress=False,
                    logging__tensorboard=False, export__hf=False, grpo__kl_coef=0.0, rollout__prompt_len=24,
                    train__seq_len=40)
  stages.train(cfg, str(tmp_path / "run"))
  assert len(CALLS) >= 4  # Two training iterations and the evaluations (baseline, 1, 2).
  assert all(all(ok) for ok in CALLS) and sum(map(len, CALLS)) > 0
  train_rows = [r for r in map(json.loads, open(os.path.join(tmp_path, "run", "metrics.jsonl")))
                if r["split"] == "train"]
  for r in train_rows:  # The metrics users of these methods watch.
    assert 0.0 <= r["zero_variance_groups"] <= 1.0 and 0.0 <= r["no_eos_fraction"] <= 1.0
    assert r["response_length_max"] >= r["response_length"] > 0
  evals_rows = [json.loads(x) for x in open(os.path.join(tmp_path, "run", "eval_samples.jsonl"))]
  assert {r["prompt"] for r in evals_rows} <= {r["prompt"] for r in rows[48:]}  # The record's prompt as written.


def test_a_crashing_or_hanging_reward_function_costs_samples_not_the_run(caplog):
  import time

  def crashes_on_b(prompts, completions):
    if "b" in completions:
      raise RuntimeError("boom")
    return [1.0] * len(completions)

  def hangs(prompts, completions):
    time.sleep(5)
    return [1.0] * len(completions)

  before = sum(functions.FAILURES.values())
  with caplog.at_level("WARNING"):
    v = functions.values([("crashes_on_b", crashes_on_b, 1.0), ("hangs", hangs, 1.0)], ["p"] * 3, ["a", "b", "c"],
                         timeout=0.5)
  np.testing.assert_array_equal(v[:, 0], [1.0, np.nan, 1.0])  # Only the sample it crashes on.
  assert np.isnan(v[:, 1]).all()
  assert sum(functions.FAILURES.values()) - before == 4
  text = " ".join(r.getMessage() for r in caplog.records)
  assert "reward function crashes_on_b failed (RuntimeError: boom)" in text and "hangs: no result within" in text


def even_length(prompts, completions, **_):
  return [float(len(c) % 2 == 0) for c in completions]


def test_evaluate_reports_pass_at_k_and_mean_at_k(tiny, tmp_path):
  from jaxalign.loops import evaluate
  from tests.conftest import load_config
  from tests import fixtures

  rows = [{"prompt": r["prompt"], "answer": "x"} for r in fixtures.prompt_completion_rows(12)]
  data = fixtures.write_jsonl(str(tmp_path / "eval.jsonl"), rows)
  cfg = load_config("evaluate", "tiny", model__init=tiny["model"], data__eval=data, eval__samples_per_prompt=3,
                    reward__eval_functions=("tests.rewards.test_verifiers:even_length",), eval__batch_size=8,
                    rollout__prompt_len=24, train__seq_len=40, logging__progress=False, logging__tensorboard=False)
  metrics = evaluate.run(cfg, str(tmp_path / "ev"))
  samples = [json.loads(x) for x in open(tmp_path / "ev" / "samples.jsonl")]
  assert len(samples) == 36 and [s["sample"] for s in samples[:4]] == [0, 1, 2, 0]
  v = np.asarray([s["reward/even_length"] for s in samples]).reshape(12, 3)
  assert metrics["reward/even_length"] == pytest.approx(v.mean())  # mean@3
  assert metrics["pass@3/even_length"] == pytest.approx((v >= 1.0).any(-1).mean())
  assert metrics["pass@3/even_length_se"] >= 0.0
