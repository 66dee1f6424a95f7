"""The CPU launchers' allocator: what they set, when they leave a process alone, and that it keeps XLA's
temporaries between calls (no page faults per step) in a real relaunched process."""

import json
import os
import subprocess
import sys

import pytest

from jaxalign import cpu_runtime

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
linux_glibc = pytest.mark.skipif(cpu_runtime.tuned_environ({"JAX_PLATFORMS": "cpu"}) is None,
                                 reason="glibc on Linux only")


@linux_glibc
def test_tuned_environ_adds_every_tunable_once_and_marks_the_process():
  env = cpu_runtime.tuned_environ({"JAX_PLATFORMS": "cpu", "HOME": "/h"})
  assert env["HOME"] == "/h" and env[cpu_runtime.SWITCH] == "applied"
  items = env["GLIBC_TUNABLES"].split(":")
  assert sorted(items) == sorted(f"{k}={v}" for k, v in cpu_runtime.TUNABLES.items())
  assert cpu_runtime.tuned_environ(env) is None  # relaunched once, never again


@linux_glibc
def test_a_users_own_tunables_win():
  env = cpu_runtime.tuned_environ({"JAX_PLATFORMS": "cpu", "GLIBC_TUNABLES": "glibc.malloc.arena_max=4:glibc.foo=1"})
  items = env["GLIBC_TUNABLES"].split(":")
  assert items[:2] == ["glibc.malloc.arena_max=4", "glibc.foo=1"]
  assert sum(i.startswith("glibc.malloc.arena_max=") for i in items) == 1
  assert "glibc.malloc.mmap_max=0" in items


def test_accelerators_and_the_off_switch_are_left_alone():
  assert cpu_runtime.tuned_environ({"JAX_PLATFORMS": "tpu"}) is None
  assert cpu_runtime.tuned_environ({"JAX_PLATFORMS": "cuda,cpu"}) is None
  assert cpu_runtime.tuned_environ({"JAX_PLATFORMS": "cpu", cpu_runtime.SWITCH: "0"}) is None
  assert cpu_runtime.runs_on_cpu({"JAX_PLATFORMS": "cpu,tpu"})


def test_a_cpu_host_with_libtpu_installed_counts_as_the_cpu(monkeypatch):
  """The test extra installs libtpu for compile plans; without TPU device files JAX runs on the CPU."""
  real = cpu_runtime.importlib.util.find_spec
  monkeypatch.setattr(cpu_runtime.importlib.util, "find_spec", lambda m: object() if m == "libtpu" else real(m))
  monkeypatch.setattr(cpu_runtime.glob, "glob", lambda pattern: [])
  assert cpu_runtime.runs_on_cpu({})
  monkeypatch.setattr(cpu_runtime.glob, "glob", lambda pattern: ["/dev/accel0"] if "accel" in pattern else [])
  assert not cpu_runtime.runs_on_cpu({})


SCRIPT = r"""
import json, os, resource, sys
print("pid", os.getpid(), flush=True)  # printed twice, by one pid, when the process relaunched itself
from jaxalign import cli
cli._prepare_process()
import jax, jax.numpy as jnp

@jax.jit
def f(a, b, v):  # a 64 MiB outer product XLA:CPU materialises as a temporary before the matrix-vector product
  return jnp.exp(jnp.outer(a, b) * 1e-3) @ v

a = b = v = jnp.linspace(0.0, 1.0, 4096, dtype=jnp.float32)
temp = f.lower(a, b, v).compile().memory_analysis().temp_size_in_bytes
for _ in range(3):
  f(a, b, v).block_until_ready()
r0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(5):
  f(a, b, v).block_until_ready()
faults = (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - r0) / 5
print(json.dumps({"temp": temp, "faults": faults, "switch": os.environ.get("JAXALIGN_CPU_MALLOC"),
                  "tunables": os.environ.get("GLIBC_TUNABLES", "")}))
"""


def _run(extra_env):
  env = {k: v for k, v in os.environ.items() if k not in ("GLIBC_TUNABLES", cpu_runtime.SWITCH)}
  env.update(JAX_PLATFORMS="cpu", PYTHONPATH=ROOT, **extra_env)
  out = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, env=env, timeout=300)
  assert out.returncode == 0, out.stderr[-2000:]
  lines = out.stdout.strip().splitlines()
  return [ln for ln in lines if ln.startswith("pid ")], json.loads(lines[-1])


@linux_glibc
def test_relaunched_launcher_keeps_xla_temporaries_between_calls():
  pids, tuned = _run({})
  assert len(pids) == 2 and pids[0] == pids[1], pids  # relaunched in place: same process, same pid
  assert tuned["switch"] == "applied" and "glibc.malloc.arena_max=1" in tuned["tunables"]
  pages = tuned["temp"] / 4096
  assert tuned["temp"] >= 60 << 20
  assert tuned["faults"] < 0.02 * pages, tuned  # the 64 MiB temporary is reused, not faulted in per call
  pids, plain = _run({cpu_runtime.SWITCH: "0"})
  assert len(pids) == 1 and plain["switch"] == "0"
  thp = "/sys/kernel/mm/transparent_hugepage/enabled"
  if not (os.path.exists(thp) and "[always]" in open(thp).read()):  # glibc's default: a fresh mapping per call, faulted in 4 KiB at a time
    assert plain["faults"] > 0.5 * pages, plain


@pytest.mark.parametrize("argv,relaunched", [(["train.py", "--config=sft"], True),
                                             (["train.py", "--config=sft", "--dry_run"], False),
                                             (["train.py", "--dry_run=true"], False),
                                             (["train.py", "--dry_run=false"], True)])
def test_launchers_relaunch_for_runs_not_for_compile_plans(monkeypatch, argv, relaunched):
  from jaxalign import cli

  calls = []
  monkeypatch.setenv("JAX_PLATFORMS", "cpu")  # _skip_absent_tpu would otherwise set it for the whole session
  monkeypatch.setattr(cpu_runtime, "relaunch", lambda: calls.append(1))
  monkeypatch.setattr(cli.sys, "argv", argv)
  cli._prepare_process()
  assert bool(calls) == relaunched
