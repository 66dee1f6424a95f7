"""The CPU backend's process settings: glibc's allocator tuned for XLA:CPU, applied by relaunching the process.

Why: XLA:CPU allocates a program's temporaries afresh on every call (277 MiB for the bench's SFT step) and
glibc serves an allocation that large from a fresh `mmap` and returns it with `munmap`, so every step
page-faults its whole working set in again, 4 KiB at a time (70,840 minor faults per step, counted with
getrusage) inside the kernels that first touch it. Routing large blocks through one arena that is never
trimmed (`arena_max=1`, `mmap_max=0`) keeps the memory between steps (0 faults), and `hugetlb=1` lets the
kernel back it with transparent huge pages. Measured on a 2-core AMD EPYC (`python3 bench/flags.py
--variants=default,keep1_huge --rounds=2`): median SFT step 0.380 -> 0.309 s, p90/min 1.13 -> 1.08.
The cost is XLA's compile: one arena serialises its threads' allocations (the SFT step's compile 2.5-2.9 ->
3.8-5.0 s; a larger per-thread cache took most of that back but let cached small blocks pin the freed
temporaries' space, and the heap grew by a temporary every step), paid once per program with the persistent
compilation cache; and the process keeps its heap's high-water mark (docs/performance.md, "The allocator").

glibc reads its tunables only when a process starts, so the launchers (`launch/train.py`, `launch/pipeline.py`,
the `jaxalign` command) re-execute themselves once with `GLIBC_TUNABLES` set: same pid, same arguments,
before jax is imported. Only on Linux with glibc and only when JAX will run on the CPU (TPU and GPU hosts are
untouched); tunables a user already set win; `JAXALIGN_CPU_MALLOC=0` turns it off. A script that imports
jaxalign calls `relaunch()` at its top for the same effect.
"""

from __future__ import annotations

import glob
import importlib.util
import os
import sys

# key -> value; see the module docstring for why each.
TUNABLES = {
    "glibc.malloc.arena_max": "1",          # every thread allocates from the main (brk) heap, which can hold a
                                            # block of any size; other arenas' heaps are capped at 64 MiB
    "glibc.malloc.mmap_max": "0",           # large blocks from that heap, not a fresh mapping per allocation
    "glibc.malloc.trim_threshold": str(1 << 36),  # freed memory stays in the process for the next step
    "glibc.malloc.hugetlb": "1",            # madvise(MADV_HUGEPAGE) on the heap (glibc >= 2.35; ignored before)
}
SWITCH = "JAXALIGN_CPU_MALLOC"  # "0" (or off/false/no): leave the allocator alone. Set to "applied" by relaunch().
OFF = ("0", "off", "false", "no")


def tpu_attached() -> bool:
  """A TPU VM's device files (/dev/accel* on v2-v4 and v5e, /dev/vfio/N on v5p and later)."""
  return bool(glob.glob("/dev/accel*") or glob.glob("/dev/vfio/[0-9]*"))


def cuda_plugin_installed() -> bool:
  return any(importlib.util.find_spec(m) for m in ("jax_cuda12_plugin", "jax_cuda13_plugin"))


def runs_on_cpu(environ=os.environ) -> bool:
  """Whether JAX will run on the CPU: JAX_PLATFORMS names it first, or it is unset and the machine has no TPU
  and no NVIDIA GPU with a CUDA plugin installed. libtpu installed without a TPU (the test extra, for compile
  plans) still means the CPU."""
  plats = environ.get("JAX_PLATFORMS", "").strip()
  if plats:
    return plats.split(",")[0].strip() == "cpu"
  if tpu_attached():
    return False
  return not (cuda_plugin_installed() and glob.glob("/dev/nvidia[0-9]*"))


def merged_tunables(current: str) -> str:
  """`current` (a GLIBC_TUNABLES value) with ours added; a key the user set keeps the user's value."""
  items = [kv for kv in current.split(":") if kv]
  have = {kv.split("=", 1)[0] for kv in items}
  return ":".join(items + [f"{k}={v}" for k, v in TUNABLES.items() if k not in have])


def _glibc() -> bool:
  try:
    return (os.confstr("CS_GNU_LIBC_VERSION") or "").startswith("glibc")
  except (ValueError, OSError):  # musl and other libcs do not know the name
    return False


def tuned_environ(environ=os.environ) -> dict | None:
  """The environment to relaunch with, or None when there is nothing to do: not Linux/glibc, not the CPU,
  turned off, or already relaunched (the switch is set)."""
  if sys.platform != "linux" or not _glibc():
    return None
  if environ.get(SWITCH, "").strip().lower() in OFF + ("applied",) or not runs_on_cpu(environ):
    return None
  env = dict(environ)
  env["GLIBC_TUNABLES"] = merged_tunables(environ.get("GLIBC_TUNABLES", ""))
  env[SWITCH] = "applied"
  return env


def relaunch() -> None:
  """Re-execute this process with the tuned allocator when `tuned_environ` says so; call it before importing
  jax (glibc reads its tunables at start only). On success it does not return: the process starts over with
  the same arguments, where this call then finds the switch set and returns at once."""
  env = tuned_environ()
  if env is None:
    return
  argv = list(getattr(sys, "orig_argv", None) or [sys.executable, *sys.argv])
  sys.stdout.flush()
  sys.stderr.flush()
  try:
    os.execve(sys.executable, argv, env)
  except OSError:  # An unusual interpreter setup: run untuned rather than not at all.
    os.environ[SWITCH] = "applied"
