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


def test_evaluate_reports_pass_at_k_and_mean_at_k(tiny, tmp_path, capfd):
  from jaxalign.loops import evaluate
  from tests.conftest import load_config
  from tests import fixtures

  rows = [{"prompt": r["prompt"], "answer": "x"} for r in fixtures.prompt_completion_rows(12)]
  data = fixtures.write_jsonl(str(tmp_path / "eval.jsonl"), rows)
  cfg = load_config("evaluate", "tiny", model__init=tiny["model"], data__eval=data, eval__samples_per_prompt=3,
                    reward__eval_functions=("tests.rewards.test_verifiers:even_length",), eval__batch_size=8,
                    rollout__prompt_len=24, train__seq_len=40, logging__progress=True, logging__tensorboard=False)
  metrics = evaluate.run(cfg, str(tmp_path / "ev"))
  assert "evaluate: 100%" in capfd.readouterr().err  # A progress bar with rate and ETA (tqdm).
  samples = [json.loads(x) for x in open(tmp_path / "ev" / "samples.jsonl")]
  assert len(samples) == 36 and [s["sample"] for s in samples[:4]] == [0, 1, 2, 0]
  v = np.asarray([s["reward/even_length"] for s in samples]).reshape(12, 3)
  assert metrics["reward/even_length"] == pytest.approx(v.mean())  # mean@3
  assert metrics["pass@3/even_length"] == pytest.approx((v >= 1.0).any(-1).mean())
  assert metrics["pass@3/even_length_se"] >= 0.0


def test_informative_groups_and_take_groups():
  import jax.numpy as jnp
  from jaxalign.steps import grpo
  from jaxalign.steps.policy import Rollout

  def ro(tag, n):
    z = jnp.zeros((n, 2))
    return Rollout(jnp.full((n, 3), tag), z, z, z, z, None, jnp.zeros(n), jnp.ones(n, bool))

  v1 = jnp.asarray([[1.0], [1.0], [0.0], [1.0]])  # Groups of 2: (1, 1) equal, (0, 1) informative.
  keep = grpo.informative_groups(ro(0, 4), v1, group_size=2, fn_weights=(1.0,))
  assert keep.tolist() == [False, True]
  v2 = jnp.asarray([[0.0], [2.0], [3.0], [3.0]])
  out, vals = grpo.take_groups([ro(1, 4), ro(2, 4)], [v1, v2], jnp.asarray([1, 2]), 2)
  assert out.tokens_BS[:, 0].tolist() == [1, 1, 2, 2] and vals[:, 0].tolist() == [0.0, 1.0, 0.0, 2.0]


def even_prompt_constant(prompts, completions, id, **_):
  """Rows with an even id get a constant reward (their groups carry no signal); odd ones vary."""
  return [1.0 if i % 2 == 0 else float(len(c) % 2) for c, i in zip(completions, id)]


def test_dynamic_sampling_drops_constant_groups_and_refills(tiny, tmp_path):
  from jaxalign.loops import stages
  from tests.conftest import load_config
  from tests import fixtures

  rows = [{"prompt": r["prompt"], "id": i} for i, r in enumerate(fixtures.prompt_completion_rows(64))]
  train = fixtures.write_jsonl(str(tmp_path / "train.jsonl"), rows)
  cfg = load_config("grpo", "tiny", model__init=tiny["model"], data__train=train, data__eval_fraction=0.0,
                    reward__functions=("tests.rewards.test_verifiers:even_prompt_constant",), train__steps=2,
                    eval__every=0, checkpoint__every=100, logging__progress=False, logging__tensorboard=False,
                    logging__every=1, export__hf=False, grpo__kl_coef=0.0, grpo__dynamic_sampling=True,
                    grpo__max_rollouts=3, rollout__prompt_len=24, train__seq_len=40)
  stages.train(cfg, str(tmp_path / "run"))
  train_rows = [r for r in map(json.loads, open(tmp_path / "run" / "metrics.jsonl")) if r["split"] == "train"]
  assert len(train_rows) == 2
  for r in train_rows:
    assert r["dropped_groups"] >= 0.3  # About half the prompts have even ids: their groups are dropped.
    assert r["dynamic_rollouts"] >= 2  # So more prompts were drawn to refill the batch.
    assert r["zero_variance_groups"] <= r["dropped_groups"]  # The update's batch holds fewer of them.
  summary = [r for r in map(json.loads, open(tmp_path / "run" / "metrics.jsonl")) if r["split"] == "summary"]
  assert summary and summary[0]["compiles"] <= 2 + 0  # Rollout and update compiled once each.


def test_arithmetic_task_is_verifiable_and_its_splits_are_disjoint(tmp_path):
  from jaxalign.data.tasks import arithmetic

  p = arithmetic.write_task(str(tmp_path), seed=3, n_sft=300, n_prompts=100, n_eval=50)
  load = lambda k: [json.loads(x) for x in open(p[k])]  # noqa: E731
  train, evals, sft = load("prompts_train"), load("prompts_eval"), load("sft_train")
  assert len(train) == 100 and len(evals) == 50 and len(sft) == 300
  assert not {r["prompt"] for r in evals} & ({r["prompt"] for r in train} | {r["prompt"] for r in sft})
  for r in train:
    a, b = (int(x.replace(" ", "")) for x in r["prompt"].rstrip(" =").split(" + "))
    assert int(r["answer"].replace(" ", "")) == a + b
  # The references pass the verifier; a wrong answer does not.
  assert verifiers.exact_answer(None, [" " + r["answer"] for r in evals], answer=[r["answer"] for r in evals]) == \
      [1.0] * 50
  assert verifiers.exact_answer(None, ["1 2"], answer=["1 3"]) == [0.0]
