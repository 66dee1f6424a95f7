"""What launch/train.py calls: distributed init, device log, stage dispatch with clean exits."""

from __future__ import annotations

import logging
import os

import jax


def init_distributed(mode: str, coordinator=None, num_processes=None, process_id=None):
  """Start JAX's multi-controller runtime: explicit flags, or auto-detected on TPU pods and under SLURM."""
  if mode == "off":
    return
  explicit = coordinator is not None or num_processes is not None
  if explicit or mode == "on":
    # CPU processes need a collectives backend; gloo ships with jaxlib (used by the multi-process tests).
    if os.environ.get("JAX_PLATFORMS", "") in ("", "cpu"):
      try:
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
      except Exception:  # Older/newer JAX without the option: its default applies.
        pass
  if explicit:
    if None in (coordinator, num_processes, process_id):
      raise ValueError("--coordinator, --num_processes and --process_id must be given together")
    jax.distributed.initialize(coordinator, num_processes, process_id)
  elif mode == "on" or any(k in os.environ for k in ("SLURM_JOB_ID", "TPU_WORKER_HOSTNAMES", "MEGASCALE_COORDINATOR_ADDRESS")):
    if "SLURM_JOB_ID" in os.environ and int(os.environ.get("SLURM_NTASKS", "1")) <= 1 and mode == "auto":
      return
    jax.distributed.initialize()


def quiet_libraries():
  """Orbax logs every file it renames at INFO; keep its warnings and errors only."""
  logging.getLogger("absl").addFilter(lambda r: r.levelno >= logging.WARNING or "orbax" not in r.pathname)
  for name in ("jax._src.xla_bridge", "jax._src.distributed"):
    logging.getLogger(name).setLevel(logging.WARNING)


def log_devices():
  logging.info("JAX %s: process %d of %d, %d local / %d global %s devices", jax.__version__, jax.process_index(),
               jax.process_count(), jax.local_device_count(), jax.device_count(), jax.devices()[0].platform)


STAGES = {
    "sft": ("jaxalign.loops.offline", "train_sft"),
    "reward": ("jaxalign.loops.preference", "train_reward"),
    "dpo": ("jaxalign.loops.preference", "train_dpo"),
    "ppo": ("jaxalign.loops.online", "train_ppo"),
    "grpo": ("jaxalign.loops.online", "train_grpo"),
    "evaluate": ("jaxalign.loops.evaluate", "evaluate"),
}


def train(config, workdir: str) -> int:
  """Run the configured stage; returns the process exit code (0 also for a clean preemption stop)."""
  import importlib

  from jaxalign.loops.offline import NonFiniteError, Preempted

  quiet_libraries()
  if config.stage not in STAGES:
    raise ValueError(f"stage={config.stage!r}: expected one of {sorted(STAGES)}")
  mod, fn = STAGES[config.stage]
  try:
    getattr(importlib.import_module(mod), fn)(config, workdir)
  except Preempted as e:
    logging.warning("%s", e)
    print(str(e), flush=True)
    return 0
  except NonFiniteError as e:
    logging.error("%s", e)
    print(f"error: {e}", flush=True)
    return 3
  return 0


def dry_run(config):
  from jaxalign import memory

  memory.report(config)
