"""Two contenders in lockstep: one step of one, then one step of the other, for every timed step.

`bench/run.py` runs contenders one after another, minutes apart; on a shared VM whose load drifts over
minutes, whichever ran in a quiet spell looks faster, and pooling rounds only spreads that. Here both
processes are started, compiled and warmed, and then take turns: the parent lets one step run (the other
process waits on a pipe, its threads asleep), then the other, alternating who goes first (A B B A ...). Step
i of one and step i of the other ran seconds apart under the same load, so the ratio of each such pair is
the comparison with the drift taken out; the median of those ratios is the figure, with its quartiles.

The contender's side is `workloads._gate()`, called before each step of its timed loop.
"""

from __future__ import annotations

import os
import subprocess
import tempfile
import time

SETTLE_S = 0.05  # Between turns: lets the finished contender's spinning threads go to sleep.


class _Child:
  def __init__(self, cmd, env):
    go_r, self.go = os.pipe()
    self.ready, ready_w = os.pipe()
    self.out, self.err = tempfile.TemporaryFile("w+"), tempfile.TemporaryFile("w+")
    env = dict(env, JAXALIGN_BENCH_GATE=f"{go_r},{ready_w}")
    self.proc = subprocess.Popen(cmd, env=env, pass_fds=(go_r, ready_w), stdout=self.out, stderr=self.err,
                                 cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    os.close(go_r)
    os.close(ready_w)
    self.alive = self.wait()

  def wait(self) -> bool:
    """Blocks until the child reaches its next gate (True) or is done (False)."""
    return os.read(self.ready, 1) == b"r"

  def step(self):
    os.write(self.go, b"g")
    self.alive = self.wait()

  def result(self) -> dict | str:
    import json
    os.close(self.go)
    self.proc.wait()
    self.out.seek(0)
    self.err.seek(0)
    lines = self.out.read().strip().splitlines()
    if self.proc.returncode != 0 or not lines:
      tail = self.err.read().strip().splitlines()[-1:] or ["?"]
      return tail[0][:160]
    return json.loads(lines[-1])


def pair(a: tuple, b: tuple) -> dict:
  """Runs two contenders given as (cmd, env) in lockstep; returns {'a': stats, 'b': stats, 'ratio': ...} where
  the ratio is b's step time over a's, pair by pair (above 1: a is faster)."""
  import numpy as np
  kids = [_Child(*a), _Child(*b)]  # Both start, compile and warm up side by side, then wait at their first gate.
  turn = 0
  while any(k.alive for k in kids):
    order = kids if turn % 2 == 0 else kids[::-1]
    for k in order:
      if k.alive:
        k.step()
        time.sleep(SETTLE_S)
    turn += 1
  ra, rb = (k.result() for k in kids)
  if isinstance(ra, str) or isinstance(rb, str):
    return {"a": ra, "b": rb}
  n = min(len(ra["times"]), len(rb["times"]))
  r = np.asarray(rb["times"][:n]) / np.asarray(ra["times"][:n])
  return {"a": ra, "b": rb, "ratio": {"median": float(np.median(r)), "q25": float(np.percentile(r, 25)),
                                      "q75": float(np.percentile(r, 75)), "n": int(n),
                                      "a_faster": float(np.mean(r > 1))}}
