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
