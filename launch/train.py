"""Thin entry point: flags -> (jax.distributed) -> train(config, workdir).

  python launch/train.py --config=configs/sft.py --workdir=runs/sft --config.optimizer.learning_rate=1e-5
"""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import app, flags, logging  # noqa: E402
from ml_collections import config_flags  # noqa: E402

_CONFIG = config_flags.DEFINE_config_file("config", None, "Stage config file (configs/<stage>.py[:variant]).",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Run directory (local or gs://): checkpoints, metrics, export/.")
_DIST = flags.DEFINE_enum("distributed", "auto", ["auto", "on", "off"],
                          "jax.distributed: auto (TPU pods, SLURM), on (needs coordinator flags), off.")
_COORD = flags.DEFINE_string("coordinator", None, "host:port of process 0 (explicit multi-process).")
_NPROC = flags.DEFINE_integer("num_processes", None, "Number of processes (explicit multi-process).")
_PID = flags.DEFINE_integer("process_id", None, "This process's id (explicit multi-process).")
_DRY = flags.DEFINE_bool("dry_run", False, "Compile the stage's steps from shapes alone; print per-device memory, write WORKDIR/plan.json; no weight or data read.")
_TOPOLOGY = flags.DEFINE_string("topology", "", "With --dry_run: compile for a Cloud TPU slice (v4-8, v5e-16, "
                                 "v5p-128, v6e-64, ...) instead of the local devices (needs libtpu, not a TPU).")
_SLICES = flags.DEFINE_integer("num_slices", 1, "With --topology: number of slices (multislice).")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
  del argv
  from jaxalign import launch_utils

  launch_utils.init_distributed(_DIST.value, _COORD.value, _NPROC.value, _PID.value)
  config = _CONFIG.value
  launch_utils.log_devices()
  if _DRY.value:
    launch_utils.dry_run(config, _WORKDIR.value, _TOPOLOGY.value, _SLICES.value)
    return
  code = launch_utils.train(config, _WORKDIR.value)
  sys.exit(code)


if __name__ == "__main__":
  logging.set_verbosity(logging.INFO)
  from jaxalign import errors

  errors.run_main(app.run, main)
