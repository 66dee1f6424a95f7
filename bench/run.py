"""Side-by-side benchmarks: jaxalign, the plain-JAX floor and the PyTorch peers, in one run.

  python3 bench/run.py                 # everything (PyTorch peers need `pip install -e .[bench]`)
  python3 bench/run.py --only=sft      # one group: sft | pairs | sampler | scaling | peak
  python3 bench/run.py --paired=sft,online --steps=30   # jaxalign and each peer in lockstep (bench/lockstep.py)

Each contender runs in its own subprocess (separate thread pools), one after another; the parent prints a
table with medians, min/max and ratios measured in this same run, and writes bench/results.json.
With --rounds=N (default 2 for the peer groups) each group's contenders run N times in turn (A B C A B C) and
every figure pools its timed steps over the rounds: a shared VM's load drifts over minutes, and alternating
spreads the drift over all contenders instead of favouring whichever ran in a quiet spell. The ratios are
also printed round by round (a drift between rounds cancels within one), and before every contender the
parent times one second of a fixed numpy matmul: the machine's own spread over the same minutes, printed as
the last row of the spread table, beside which the contenders' p90/min reads.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))

from jaxalign import cpu_runtime  # noqa: E402  (no jax import: the parent only spawns)

JOBS = {
    "peak": [("peak_matmul", "peak_matmul_flops", {})],
    "sft": [("jaxalign_sft", "jaxalign_sft", {}), ("plain_jax_sft", "plain_jax_sft", {}),
            ("torch_sft", "torch_sft", {}), ("trl_sft", "trl_sft", {})],
    "pairs": [("jaxalign_reward", "jaxalign_pairs", {"kind": "reward"}), ("jaxalign_dpo", "jaxalign_pairs", {"kind": "dpo"}),
              ("torch_dpo", "torch_dpo", {}), ("trl_dpo", "trl_dpo", {})],
    "online": [("jaxalign_grpo", "jaxalign_grpo", {}), ("trl_grpo", "trl_grpo", {}),
               ("jaxalign_ppo", "jaxalign_ppo", {})],
    "sampler": [("jaxalign_sampler", "jaxalign_sampler", {}), ("torch_generate", "torch_generate", {})],
    "scaling": [(f"jaxalign_sft_T{t}", "jaxalign_sft", {"seq": t, "batch": max(1, 2048 // t), "steps": 5})
                for t in (128, 256, 512, 1024, 2048)] +
               [(f"jaxalign_sft_B{b}", "jaxalign_sft", {"batch": b, "steps": 5}) for b in (2, 4, 8, 16)],
}


def _one(fn: str, kwargs: dict):
  from bench import workloads
  return getattr(workloads, fn)(**kwargs)


def _command(fn, kwargs):
  """The contender's subprocess: its command line and environment."""
  cmd = [sys.executable, os.path.abspath(__file__), "--one", fn, "--kwargs", json.dumps(kwargs)]
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
  if fn.startswith(("jaxalign", "plain_jax")):  # As the launchers run JAX on the CPU (cpu_runtime); the floor too.
    env = cpu_runtime.tuned_environ(env) or env
  return cmd, env


def _spawn(name, fn, kwargs):
  cmd, env = _command(fn, kwargs)
  t = time.time()
  out = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=os.path.dirname(HERE))
  if out.returncode != 0:
    tail = (out.stderr or out.stdout).strip().splitlines()[-1:] or ["?"]
    print(f"  {name}: not measured ({tail[0][:160]})", flush=True)
    return None
  res = json.loads(out.stdout.strip().splitlines()[-1])
  print(f"  {name}: {json.dumps(res)} ({time.time() - t:.0f}s)", flush=True)
  return res


# --paired: the headline comparisons in lockstep (bench/lockstep.py), each (jaxalign, other) step by step.
PAIRS = {"sft": [("jaxalign_sft", "torch_sft"), ("jaxalign_sft", "trl_sft")],
         "pairs": [("jaxalign_dpo", "torch_dpo"), ("jaxalign_dpo", "trl_dpo")],
         "online": [("jaxalign_grpo", "trl_grpo")]}

ROUNDS = {"peak": 1, "scaling": 1}  # Groups not listed run --rounds times.


def machine_probe(seconds: float = 1.0, n: int = 768) -> float:
  """Seconds per float32 n x n matmul (numpy's BLAS, both cores) averaged over a `seconds` window: run between
  contenders, the machine's own throughput over the run. On a shared VM it drifts by itself (a 2-core Xeon of
  2026-12-05: 1.36x between 2 s windows of one minute), and a contender's step spread can only be read beside
  it."""
  import numpy as np
  a = np.random.default_rng(0).random((n, n), dtype=np.float32)
  a @ a
  k, t = 0, time.perf_counter()
  while time.perf_counter() - t < seconds:
    a @ a
    k += 1
  return (time.perf_counter() - t) / k


def _pool(runs: list) -> dict | None:
  """One figure from several rounds: statistics over all their timed steps; compile time of the first."""
  import numpy as np
  runs = [r for r in runs if r]
  if not runs or "times" not in runs[0]:
    return runs[0] if runs else None
  t = np.concatenate([r["times"] for r in runs])
  return {**runs[0], "median_s": float(np.median(t)), "min_s": float(t.min()), "max_s": float(t.max()),
          "p90_s": float(np.percentile(t, 90)), "n": int(t.size), "rounds": len(runs),
          "round_medians": [r["median_s"] for r in runs]}


def cpu_model() -> str:
  """The CPU's model name (Linux /proc/cpuinfo; else platform's guess): figures depend on it."""
  try:
    with open("/proc/cpuinfo") as f:
      for line in f:
        if line.startswith("model name"):
          return line.split(":", 1)[1].strip()
  except OSError:
    pass
  import platform
  return platform.processor() or platform.machine()


def spread(r: dict) -> list[str]:
  """Per contender: min, median and p90 of its timed steps pooled over the rounds, p90/min (the stability
  figure of issue 23) and each round's median."""
  lines = ["| contender | steps | min (s) | median (s) | p90 (s) | p90 / min | round medians (s) |",
           "|---|---|---|---|---|---|---|"]
  for k, v in r.items():
    if isinstance(v, dict) and "min_s" in v and "p90_s" in v:
      rm = ", ".join(f"{x:.3f}" for x in v.get("round_medians", []))
      lines.append(f"| {k} | {v['n']} | {v['min_s']:.3f} | {v['median_s']:.3f} | {v['p90_s']:.3f} | "
                   f"{v['p90_s'] / v['min_s']:.2f} | {rm} |")
  m = r.get("machine_probe")
  if m:  # The machine's own spread over the same minutes (1 s windows of one fixed matmul, between contenders).
    import numpy as np
    t = np.asarray(m["times"])
    lines.append(f"| machine: numpy {m['n']}x{m['n']} matmul, {t.size} windows of 1 s between contenders | - | "
                 f"{t.min():.5f} | {np.median(t):.5f} | {np.percentile(t, 90):.5f} | "
                 f"{np.percentile(t, 90) / t.min():.2f} | - |")
  return lines


def report(r: dict) -> list[str]:
  from bench import workloads as W
  lines = []
  peak = r.get("peak_matmul", {}).get("flops")

  def tps(k):
    x = r.get(k)
    return x["tokens_per_step"] / x["median_s"] if x else None

  rows = [("SFT step (tokens/s)", "jaxalign_sft", "plain_jax_sft", "torch_sft", tps)]
  lines.append("| figure | jaxalign | plain JAX | PyTorch eager | jaxalign / plain JAX | jaxalign / PyTorch |")
  lines.append("|---|---|---|---|---|---|")
  for label, a, b, c, f in rows:
    va, vb, vc = f(a), f(b), f(c)
    lines.append(f"| {label} | {_n(va)} | {_n(vb)} | {_n(vc)} | {_ratio(va, vb)} | {_ratio(va, vc)} |")
  pairs = lambda k: (r[k]["pairs_per_step"] / r[k]["median_s"]) if r.get(k) else None  # noqa: E731
  lines.append(f"| SFT step vs TRL SFTTrainer (tokens/s) | {_n(tps('jaxalign_sft'))} | - | {_n(tps('trl_sft'))} (TRL) | - "
               f"| {_ratio(tps('jaxalign_sft'), tps('trl_sft'))} |")
  lines.append(f"| DPO step (pairs/s) | {_f1(pairs('jaxalign_dpo'))} | - | {_f1(pairs('torch_dpo'))} | - | "
               f"{_ratio(pairs('jaxalign_dpo'), pairs('torch_dpo'))} |")
  lines.append(f"| DPO step vs TRL DPOTrainer (pairs/s) | {_f1(pairs('jaxalign_dpo'))} | - | {_f1(pairs('trl_dpo'))} (TRL) "
               f"| - | {_ratio(pairs('jaxalign_dpo'), pairs('trl_dpo'))} |")
  sps = lambda k: (r[k]["samples_per_iteration"] / r[k]["median_s"]) if r.get(k) else None  # noqa: E731
  lines.append(f"| GRPO iteration (samples/s) | {_f1(sps('jaxalign_grpo'))} | - | {_f1(sps('trl_grpo'))} (TRL GRPOTrainer) "
               f"| - | {_ratio(sps('jaxalign_grpo'), sps('trl_grpo'))} |")
  lines.append(f"| PPO iteration (samples/s) | {_f1(sps('jaxalign_ppo'))} | - | - (not run: TRL 1.16 has PPO only in trl.experimental) | - | - |")
  lines.append(f"| reward-model step (pairs/s) | {_f1(pairs('jaxalign_reward'))} | - | - | - | - |")
  ntok = lambda k: (r[k]["new_tokens"] / r[k]["median_s"]) if r.get(k) else None  # noqa: E731
  lines.append(f"| sampler (new tokens/s) | {_n(ntok('jaxalign_sampler'))} | - | {_n(ntok('torch_generate'))} (generate) "
               f"| - | {_ratio(ntok('jaxalign_sampler'), ntok('torch_generate'))} |")
  lines.append("")
  comp = {k: v["compile_s"] for k, v in r.items() if isinstance(v, dict) and v.get("compile_s")}
  if comp:
    lines.append("Compile time (s): " + ", ".join(f"{k} {v:.1f}" for k, v in comp.items()))
  if peak and r.get("jaxalign_sft"):
    achieved = W.model_flops_per_token() * tps("jaxalign_sft")
    lines.append(f"Model FLOP/s of the jaxalign SFT step: {achieved / 1e9:.1f} GFLOP/s; measured peak f32 matmul: "
                 f"{peak / 1e9:.1f} GFLOP/s; MFU {achieved / peak:.1%}")
  scal = [(k, v) for k, v in r.items() if k.startswith("jaxalign_sft_") and v]
  if scal:
    lines.append("")
    lines.append("| scaling run | tokens/step | median step (s) | tokens/s |")
    lines.append("|---|---|---|---|")
    for k, v in scal:
      lines.append(f"| {k} | {v['tokens_per_step']} | {v['median_s']:.3f} | {v['tokens_per_step'] / v['median_s']:.0f} |")
  return lines


def per_round(r: dict) -> list[str]:
  """Each headline ratio round by round: contenders of one round ran minutes apart, so a drift of the machine
  between rounds (which pooling mixes into both figures) cancels within a round."""
  out = []
  for label, a, b in (("SFT vs PyTorch eager", "jaxalign_sft", "torch_sft"), ("SFT vs TRL", "jaxalign_sft", "trl_sft"),
                      ("DPO vs PyTorch eager", "jaxalign_dpo", "torch_dpo"), ("DPO vs TRL", "jaxalign_dpo", "trl_dpo"),
                      ("GRPO vs TRL", "jaxalign_grpo", "trl_grpo")):
    ra, rb = (r.get(a) or {}).get("round_medians"), (r.get(b) or {}).get("round_medians")
    if ra and rb and len(ra) == len(rb) and len(ra) > 1:
      out.append(f"{label} " + ", ".join(f"{y / x:.2f}x" for x, y in zip(ra, rb)))
  return ["Ratios per round (same units per step: the other's median over jaxalign's): " + "; ".join(out)] if out else []


def _n(x):
  return "-" if x is None else f"{x:,.0f}"


def _f1(x):
  return "-" if x is None else f"{x:,.1f}"


def _ratio(a, b):
  return "-" if a is None or b is None else f"{a / b:.2f}x"


def _meta(command: str) -> dict:
  """Where and how a run was measured: the machine, its CPU, the JAX contenders' allocator, time, command."""
  import platform
  tuned = cpu_runtime.tuned_environ(dict(os.environ))  # what _command gives the JAX contenders
  return {"machine": platform.machine(), "cpu": cpu_model(), "cpus": os.cpu_count(),
          "jax_allocator": tuned["GLIBC_TUNABLES"] if tuned else "as the environment gives it",
          "time": time.strftime("%Y-%m-%d %H:%M"), "command": command}


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument("--only", default="peak,sft,pairs,online,sampler,scaling")
  ap.add_argument("--one", default=None)
  ap.add_argument("--kwargs", default="{}")
  ap.add_argument("--out", default=os.path.join(HERE, "results.json"))
  ap.add_argument("--rounds", type=int, default=2)
  ap.add_argument("--paired", default=None, help="groups to run in lockstep instead: sft,pairs,online")
  ap.add_argument("--steps", type=int, default=30, help="timed steps per contender with --paired")
  a = ap.parse_args()
  if a.one:
    print(json.dumps(_one(a.one, json.loads(a.kwargs))))
    return
  if a.paired:
    return paired(a)
  results, probe = {}, []
  for group in a.only.split(","):
    print(f"[{group}]", flush=True)
    runs = {name: [] for name, _, _ in JOBS[group]}
    for _ in range(ROUNDS.get(group, a.rounds)):
      for name, fn, kw in JOBS[group]:
        probe.append(machine_probe())
        runs[name].append(_spawn(name, fn, kw))
    results.update({name: _pool(rs) for name, rs in runs.items()})
  results["machine_probe"] = {"n": 768, "times": probe}
  meta = _meta(f"python3 bench/run.py --only={a.only} --rounds={a.rounds}")
  with open(a.out, "w") as f:
    json.dump({"meta": meta, "results": results}, f, indent=2)
  print(f"{meta['cpu']}, {meta['cpus']} CPUs, {meta['time']}: {meta['command']}")
  print(f"JAX contenders' allocator (as the launchers set it, jaxalign.cpu_runtime): {meta['jax_allocator']}")
  print("\n".join(report(results) + per_round(results) + [""] + spread(results)))


def paired(a):
  """--paired: each of the group's (jaxalign, other) comparisons in lockstep; prints and writes the per-pair
  ratios with each side's step spread."""
  import numpy as np
  from bench import lockstep
  kinds = {name: (fn, kw) for group in JOBS.values() for name, fn, kw in group}
  rows, out = [], {}
  for group in a.paired.split(","):
    for x, y in PAIRS[group]:
      t = time.time()
      res = lockstep.pair(*(_command(kinds[n][0], {**kinds[n][1], "steps": a.steps}) for n in (x, y)))
      out[f"{x} vs {y}"] = res
      r = res.get("ratio")
      if not r:
        print(f"  {x} vs {y}: not measured ({res['a'] if isinstance(res['a'], str) else res['b']})", flush=True)
        continue
      print(f"  {x} vs {y}: {r['median']:.2f}x ({time.time() - t:.0f}s)", flush=True)
      rows.append(f"| {x} vs {y} | {r['n']} | **{r['median']:.2f}x** ({r['q25']:.2f}-{r['q75']:.2f}) | "
                  f"{r['a_faster']:.0%} | " + " | ".join(
                      f"{np.min(v['times']):.3f} / {np.median(v['times']):.3f} / {np.percentile(v['times'], 90):.3f}"
                      for v in (res["a"], res["b"])) + " |")
  meta = _meta(f"python3 bench/run.py --paired={a.paired} --steps={a.steps}")
  with open(a.out, "w") as f:
    json.dump({"meta": meta, "paired": out}, f, indent=2)
  print(f"{meta['cpu']}, {meta['cpus']} CPUs, {meta['time']}: {meta['command']}")
  print("| comparison (in lockstep) | step pairs | other / jaxalign per pair: median (quartiles) | pairs jaxalign "
        "won | jaxalign min / median / p90 (s) | other min / median / p90 (s) |")
  print("|---|---|---|---|---|---|")
  print("\n".join(rows))


if __name__ == "__main__":
  main()
