"""Per-kernel trace of the bench's SFT step: where a slow step's extra time goes, beside a fast one.

  python3 bench/trace_steps.py                  # 16 traced steps of the bench's SFT step
  python3 bench/trace_steps.py --steps=24 --out=/tmp/trace_steps

Runs the step under `jax.profiler.trace` with XLA:CPU's per-kernel TraceMe events on
(`--xla_cpu_enable_xprof_traceme=true`), one `StepTraceAnnotation` per step, then reads the Perfetto trace back
and prints, for the fastest and the slowest step (and the median of all): wall time, the time each XLA worker
thread spent inside kernels, the idle gaps on the busiest thread, how often two kernels ran at once, and the
kernels whose time differs most between the two steps. A slow step whose every kernel is slower points at the
machine (frequency, a neighbour, memory bandwidth); one with a few much slower kernels or a long gap points at
the program or its thread pools. Results are written to OUT/trace_steps.json; docs/performance.md cites them.
"""

from __future__ import annotations

import argparse
import collections
import glob
import gzip
import json
import os
import platform
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))


def _cpu_model() -> str:
  try:
    for line in open("/proc/cpuinfo"):
      if line.startswith("model name"):
        return line.split(":", 1)[1].strip()
  except OSError:
    pass
  return platform.processor() or "?"


def run(steps: int, out: str) -> str:
  """Trace `steps` SFT steps after compile and two warm-ups; returns the Perfetto trace's path."""
  import jax
  import jax.numpy as jnp
  import numpy as np

  sys.path.insert(0, os.path.dirname(HERE))
  from bench import workloads as W
  from jaxalign.config import base
  from jaxalign.data import batching
  from jaxalign.models import transformer
  from jaxalign.optim import make_optimizer
  from jaxalign.steps import sft
  from jaxalign.steps.state import create

  cfg = W.jaxalign_cfg()
  params = {"model": transformer.init_params(cfg, jax.random.key(0))}
  ocfg = base("sft").optimizer
  with ocfg.unlocked():
    ocfg.learning_rate, ocfg.schedule, ocfg.clip_norm, ocfg.weight_decay = W.LR, "constant", 0.0, 0.0
  tx, _ = make_optimizer(ocfg, params, 100)
  state = create(params, tx, 0)
  inp, tgt = W._batch(W.SEQ, W.BATCH)
  w = np.zeros((W.BATCH, W.SEQ), np.float32)
  w[:, -W.LOSS_TOKENS:] = 1.0
  b = {"tokens": inp, "targets": tgt, "weights": w, "segment_ids": np.ones((W.BATCH, W.SEQ), np.int32),
       "positions": np.broadcast_to(np.arange(W.SEQ, dtype=np.int32), (W.BATCH, W.SEQ))}
  b = {k: jnp.asarray(v) for k, v in
       batching.cut_window(b, batching.loss_window(max(W.SEQ - W.LOSS_TOKENS, 0), W.SEQ, 4)).items()}
  step = jax.jit(lambda st, bb: sft.sft_step(st, bb, model_cfg=cfg, tx=tx), donate_argnums=0)
  for _ in range(3):  # Compile and warm up outside the trace.
    state, m = step(state, b)
    jax.block_until_ready(m["loss"])
  os.makedirs(out, exist_ok=True)
  with jax.profiler.trace(out, create_perfetto_trace=True):
    for i in range(steps):
      with jax.profiler.StepTraceAnnotation("sft_step", step_num=i):
        state, m = step(state, b)
        jax.block_until_ready(m["loss"])
  paths = sorted(glob.glob(os.path.join(out, "**", "perfetto_trace.json.gz"), recursive=True), key=os.path.getmtime)
  if not paths:
    raise SystemExit(f"no perfetto_trace.json.gz under {out}")
  return paths[-1]


def _events(path: str):
  with gzip.open(path, "rt") as f:
    data = json.load(f)
  evs = data["traceEvents"] if isinstance(data, dict) else data
  names = {}  # (pid, tid) -> thread name
  for e in evs:
    if e.get("ph") == "M" and e.get("name") == "thread_name":
      names[(e.get("pid"), e.get("tid"))] = e.get("args", {}).get("name", "")
  spans = [e for e in evs if e.get("ph") == "X" and "dur" in e]
  return spans, names


def analyse(path: str) -> dict:
  spans, names = _events(path)
  steps = sorted((e for e in spans if e["name"].startswith("sft_step")), key=lambda e: e["ts"])
  if not steps:
    raise SystemExit("no step annotations in the trace")
  # XLA:CPU kernels: the thunk executor's TraceMe spans (args.hlo_op), on its worker threads.
  kernels = [e for e in spans if "hlo_op" in e.get("args", {})]
  rows = []
  for i, s in enumerate(steps):
    t0, t1 = s["ts"], s["ts"] + s["dur"]
    ks = [e for e in kernels if t0 <= e["ts"] < t1]
    by_thread = collections.defaultdict(float)
    by_name = collections.defaultdict(float)
    for e in ks:
      by_thread[names.get((e["pid"], e["tid"]), str(e["tid"]))] += e["dur"]
      by_name[e["args"]["hlo_op"]] += e["dur"]
    busy = _union([(e["ts"], e["ts"] + e["dur"]) for e in ks])
    rows.append({"step": i, "wall_ms": s["dur"] / 1e3, "kernel_ms": sum(by_name.values()) / 1e3,
                 "busy_ms": busy / 1e3, "idle_ms": (s["dur"] - busy) / 1e3,
                 "overlap": (sum(by_name.values()) - busy) / max(busy, 1.0), "kernel_count": len(ks),
                 "threads": {k: round(v / 1e3, 1) for k, v in sorted(by_thread.items(), key=lambda kv: -kv[1])[:4]},
                 "kernels": dict(by_name)})
  return {"rows": rows}


def _union(iv) -> float:
  total, cur_s, cur_e = 0.0, None, None
  for s, e in sorted(iv):
    if cur_e is None or s > cur_e:
      if cur_e is not None:
        total += cur_e - cur_s
      cur_s, cur_e = s, e
    else:
      cur_e = max(cur_e, e)
  if cur_e is not None:
    total += cur_e - cur_s
  return total


def report(res: dict) -> str:
  rows = res["rows"]
  order = sorted(rows, key=lambda r: r["wall_ms"])
  fast, slow, med = order[0], order[-1], order[len(order) // 2]
  walls = " ".join(f"{r['wall_ms']:.0f}" for r in rows)
  lines = [f"steps (wall ms, in order): {walls}",
           f"{'':8s} {'wall':>7s} {'in kernels':>10s} {'busy':>7s} {'idle':>7s} {'overlap':>7s}  busiest threads (ms)"]
  for tag, r in (("fastest", fast), ("median", med), ("slowest", slow)):
    lines.append(f"{tag:8s} {r['wall_ms']:7.1f} {r['kernel_ms']:10.1f} {r['busy_ms']:7.1f} {r['idle_ms']:7.1f} "
                 f"{r['overlap']:7.2f}  {r['threads']}")
  diff = {k: slow["kernels"].get(k, 0) - fast["kernels"].get(k, 0) for k in set(slow["kernels"]) | set(fast["kernels"])}
  extra = slow["kernel_ms"] - fast["kernel_ms"]
  top = sorted(diff.items(), key=lambda kv: -kv[1])[:10]
  lines.append(f"slowest - fastest: wall {slow['wall_ms'] - fast['wall_ms']:+.1f} ms, kernel time {extra:+.1f} ms, "
               f"idle {slow['idle_ms'] - fast['idle_ms']:+.1f} ms; kernels slower by >20%: "
               f"{sum(1 for k, v in diff.items() if v > 0.2 * fast['kernels'].get(k, 1e9))} of {len(diff)}")
  for k, v in top:
    lines.append(f"  {v / 1e3:+7.2f} ms  {k[:70]}  ({fast['kernels'].get(k, 0) / 1e3:.2f} -> {slow['kernels'].get(k, 0) / 1e3:.2f})")
  return "\n".join(lines)


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument("--steps", type=int, default=16)
  ap.add_argument("--out", default="/tmp/jaxalign_trace_steps")
  ap.add_argument("--trace", default="", help="analyse this perfetto_trace.json.gz instead of running")
  a = ap.parse_args()
  if not a.trace:
    flags = os.environ.get("XLA_FLAGS", "")
    if "xprof_traceme" not in flags:  # Re-exec: XLA reads its flags once, at backend start.
      os.environ["XLA_FLAGS"] = (flags + " --xla_cpu_enable_xprof_traceme=true").strip()
      os.execv(sys.executable, [sys.executable] + sys.argv)
    t = time.time()
    a.trace = run(a.steps, a.out)
    print(f"traced {a.steps} steps in {time.time() - t:.1f} s: {a.trace}")
  res = analyse(a.trace)
  print(f"CPU: {_cpu_model()}, {os.cpu_count()} cores")
  print(report(res))
  json.dump({"cpu": _cpu_model(), "trace": a.trace,
             "rows": [{k: v for k, v in r.items() if k != "kernels"} for r in res["rows"]]},
            open(os.path.join(os.path.dirname(a.trace) if a.trace else a.out, "trace_steps.json"), "w"), indent=1)


if __name__ == "__main__":
  main()
