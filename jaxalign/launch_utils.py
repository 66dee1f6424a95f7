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


# Orbax warnings that are expected when a later stage reads only the params of an earlier run's checkpoint
# through a read-only manager (the other items are meant to stay unread): filtered by exact text.
ORBAX_EXPECTED = ("CheckpointManagerOptions.read_only=True, setting", "Given directory is read only",
                  "was found in the checkpoint, but could not be restored")


def _keep(record: logging.LogRecord) -> bool:
  if "orbax" not in record.pathname:
    return True
  if record.levelno < logging.WARNING:
    return False
  return not any(t in record.getMessage() for t in ORBAX_EXPECTED)


def quiet_libraries():
  """Orbax logs every file it renames at INFO, fsspec every remote file it opens; keep their warnings and errors
  (less the expected read-only ones, ORBAX_EXPECTED)."""
  logging.getLogger("absl").addFilter(_keep)
  for name in ("jax._src.xla_bridge", "jax._src.distributed", "fsspec", "gcsfs"):
    logging.getLogger(name).setLevel(logging.WARNING)


def log_devices():
  logging.info("JAX %s: process %d of %d, %d local / %d global %s devices", jax.__version__, jax.process_index(),
               jax.process_count(), jax.local_device_count(), jax.device_count(), jax.devices()[0].platform)


def train(config, workdir: str) -> int:
  """Run the configured stage; returns the process exit code (0 also for a clean preemption stop)."""
  from jaxalign import errors
  from jaxalign.loops import stages
  from jaxalign.loops.driver import CheckpointLayoutError, NonFiniteError, Preempted

  quiet_libraries()
  try:
    stages.train(config, workdir)
  except Preempted as e:
    logging.warning("%s", e)
    print(str(e), flush=True)
    return 0
  except (NonFiniteError, CheckpointLayoutError) as e:
    logging.error("%s", e)
    print(f"error: {e}", flush=True)
    return 3
  except errors.UserError as e:  # A bad config value, path or data: one line naming the key (errors.py).
    if errors.verbose():
      raise
    logging.error("%s", e)
    print(f"error: {e}", flush=True)
    return errors.EXIT_USER_ERROR
  return 0


def dry_run(config, workdir: str | None = None, topology: str = "", num_slices: int = 1,
            step_time: str = "extrapolated") -> dict:
  """Compile the stage's programs for the configured mesh over the local devices or a named TPU topology,
  from shapes alone; print per-device memory, time and MFU, and write WORKDIR/plan.json."""
  from jaxalign import paths, plan

  quiet_libraries()
  out = plan.compile_plan(config, topology, num_slices, step_time=step_time)
  print(plan.summary(out), flush=True)
  if workdir and jax.process_index() == 0:
    paths.makedirs(workdir)
    paths.write_json(paths.join(workdir, "plan.json"), out)
  return out
