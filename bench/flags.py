"""A/B of XLA:CPU flag sets (or environment settings) on one bench workload, in alternating subprocess rounds.

  python3 bench/flags.py                                   # the variants below, 3 rounds of jaxalign_sft
  python3 bench/flags.py --variants=default,eigen1 --fn=torch_sft --rounds=2 --steps=20
  python3 bench/flags.py --variants=default,launcher --fn=jaxalign_grpo --steps=6   # the launchers' allocator

Each round runs every variant once, in turn, in a fresh process (its own thread pools), so a shared VM's drift
spreads over all of them; printed per round and pooled: median, min, p90 and p90/min of the timed steps.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))

from jaxalign import cpu_runtime  # noqa: E402

VARIANTS = {
    "default": {},
    "noconc": {"XLA_FLAGS": "--xla_cpu_enable_concurrency_optimized_scheduler=false"},
    "eigen1": {"XLA_FLAGS": "--xla_cpu_multi_thread_eigen=false"},
    "nothunk": {"XLA_FLAGS": "--xla_cpu_use_thunk_runtime=false"},
    "noxnn": {"XLA_FLAGS": "--xla_cpu_use_xnnpack=false"},
    "ynn_dot": {"XLA_FLAGS": "--xla_cpu_experimental_ynn_fusion_type=dot"},
    "xnn_all": {"XLA_FLAGS": "--xla_cpu_experimental_xnn_fusion_type=dot,eltwise,reduce"},
    "onednn": {"XLA_FLAGS": "--xla_cpu_use_onednn=true"},
    "onednn_dot": {"XLA_FLAGS": "--xla_cpu_experimental_onednn_fusion_type=dot"},
    # A no-op for XLA's large blocks: glibc ignores an mmap threshold above 32 MiB (kept as measured 2026-12-01).
    "malloc": {"MALLOC_MMAP_THRESHOLD_": str(4 << 30), "MALLOC_TRIM_THRESHOLD_": str(64 << 30),
               "MALLOC_TOP_PAD_": str(1 << 30)},
    # What the launchers set (jaxalign.cpu_runtime), and the pieces of it measured one by one on 2026-12-04.
    "launcher": {"GLIBC_TUNABLES": cpu_runtime.merged_tunables("")},
    "hugetlb": {"GLIBC_TUNABLES": "glibc.malloc.hugetlb=1"},
    "keep": {"GLIBC_TUNABLES": "glibc.malloc.mmap_max=0:glibc.malloc.trim_threshold=68719476736"},
    "keep_huge": {"GLIBC_TUNABLES": "glibc.malloc.hugetlb=1:glibc.malloc.mmap_max=0:glibc.malloc.trim_threshold=68719476736"},
    "keep1": {"GLIBC_TUNABLES": "glibc.malloc.mmap_max=0:glibc.malloc.arena_max=1:glibc.malloc.trim_threshold=68719476736"},
    "keep2_huge": {"GLIBC_TUNABLES": "glibc.malloc.hugetlb=1:glibc.malloc.mmap_max=0:glibc.malloc.arena_max=2:"
                                     "glibc.malloc.trim_threshold=68719476736"},
    "keep1_huge": {"GLIBC_TUNABLES": "glibc.malloc.hugetlb=1:glibc.malloc.mmap_max=0:glibc.malloc.arena_max=1:"
                                     "glibc.malloc.trim_threshold=68719476736"},
}


def variant_env(name: str) -> dict:
  """A variant's environment; `a+b` combines variants (XLA_FLAGS joined with spaces, GLIBC_TUNABLES with ':')."""
  env = {}
  for part in name.split("+"):
    for k, v in VARIANTS[part].items():
      env[k] = f"{env[k]}{' ' if k == 'XLA_FLAGS' else ':'}{v}" if k in env and k in ("XLA_FLAGS", "GLIBC_TUNABLES") else v
  return env


def stats(t) -> str:
  t = np.asarray(t)
  return (f"median {np.median(t):.3f} min {t.min():.3f} p90 {np.percentile(t, 90):.3f} "
          f"p90/min {np.percentile(t, 90) / t.min():.2f}")


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument("--variants", default="default,noconc,eigen1")
  ap.add_argument("--fn", default="jaxalign_sft")
  ap.add_argument("--rounds", type=int, default=3)
  ap.add_argument("--steps", type=int, default=20)
  ap.add_argument("--kwargs", default="{}", help="more keyword arguments of the workload (JSON)")
  a = ap.parse_args()
  names = a.variants.split(",")
  runs = {n: [] for n in names}
  for r in range(a.rounds):
    for n in names:
      env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
      env.update(variant_env(n))
      cmd = [sys.executable, os.path.join(HERE, "run.py"), "--one", a.fn, "--kwargs", json.dumps({"steps": a.steps, **json.loads(a.kwargs)})]
      out = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=os.path.dirname(HERE))
      if out.returncode != 0:
        print(f"round {r} {n}: failed ({(out.stderr.strip().splitlines() or ['?'])[-1][:160]})", flush=True)
        continue
      res = json.loads(out.stdout.strip().splitlines()[-1])
      times = res["times"]
      runs[n].append(times)
      print(f"round {r} {n:8s} {stats(times)} compile {res.get('compile_s') or 0:.2f}", flush=True)
  for n, ts in runs.items():
    if ts:
      print(f"pooled {n:8s} {stats(np.concatenate(ts))} round medians {[round(float(np.median(x)), 3) for x in ts]}")


if __name__ == "__main__":
  main()
