"""bench/run.py --paired: two contenders take turns step by step (bench/lockstep.py), never running at once,
so each pair of steps ran under the same load of the machine."""

import json
import os
import sys

CHILD = r"""
import json, sys, time
from bench import workloads
spans = []
for i in range(6):
  workloads._gate()
  t = time.time()
  time.sleep(float(sys.argv[1]))
  spans.append((t, time.time()))
print(json.dumps({"times": [b - a for a, b in spans], "spans": spans}))
"""


def test_two_contenders_take_turns_and_their_steps_are_paired():
  from bench import lockstep
  res = lockstep.pair(*(([sys.executable, "-c", CHILD, str(s)], dict(os.environ)) for s in (0.02, 0.06)))
  steps = sorted([(x, y, "a") for x, y in res["a"]["spans"]] + [(x, y, "b") for x, y in res["b"]["spans"]])
  assert all(s[1] <= t[0] for s, t in zip(steps, steps[1:])), "two steps ran at once"
  assert "".join(s[2] for s in steps) == "abbaabbaabba"  # Who goes first alternates, turn by turn.
  r = res["ratio"]
  assert r["n"] == 6 and 2.0 < r["median"] < 4.5 and r["a_faster"] == 1.0, json.dumps(r)
