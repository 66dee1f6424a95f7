"""Every evaluation mean and win rate comes with its standard error over the prompts (issue 21)."""

import numpy as np

from jaxalign.loops import evaluate
from jaxalign.loops.sampled_eval import summarize


def test_means_come_with_standard_errors():
  x = [0.1, 0.5, 0.9, 0.2]
  out = summarize({"score": x, "one": [3.0]})
  assert out["score"] == np.mean(x)
  np.testing.assert_allclose(out["score_se"], np.std(x, ddof=1) / 2.0)
  assert out["one"] == 3.0 and out["one_se"] == 0.0


def test_win_rate_and_its_standard_error():
  a = [{"s": v} for v in (1.0, 2.0, 3.0, 0.0)]
  b = [{"s": v} for v in (0.0, 2.0, 4.0, -1.0)]
  rate, se = evaluate._judge(a, b, "s")
  wins = np.array([1.0, 0.5, 0.0, 1.0])
  assert rate == wins.mean()
  np.testing.assert_allclose(se, wins.std(ddof=1) / 2.0)


def test_dpo_eval_warns_when_chosen_responses_drift_from_the_reference(caplog):
  from jaxalign.loops import dpo

  evals = iter([{"rewards/chosen": -0.2}, {"rewards/chosen": -0.9}])
  wrapped = dpo._with_drift_warning(lambda st, step, final: dict(next(evals)), beta=0.1)
  with caplog.at_level("WARNING"):
    first = wrapped(None, 10, False)
    assert first["chosen_logratio"] == -2.0 and not caplog.records  # 2 nats: within bounds.
    second = wrapped(None, 20, False)
  assert second["chosen_logratio"] == -9.0
  assert any("9.0 nats less likely than under the reference" in r.getMessage() for r in caplog.records)
