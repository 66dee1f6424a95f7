"""Chain stages: SFT -> reward model -> DPO / PPO / GRPO -> evaluation -> report.

  python launch/pipeline.py --config=configs/quickstart.py --workdir=runs/quickstart
"""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import app, flags  # noqa: E402
from ml_collections import config_flags  # noqa: E402

_CONFIG = config_flags.DEFINE_config_file("config", None, "Pipeline config (configs/quickstart.py[:test]).")
_WORKDIR = flags.DEFINE_string("workdir", "runs/quickstart", "Directory for every stage's run and the report.")


def main(argv):
  del argv
  from jaxalign import paths, quickstart

  if paths.is_remote(_WORKDIR.value):  # The laptop path: its built-in data and report are local files.
    print(f"error: --workdir={_WORKDIR.value}: the pipeline keeps its workdir local; give a local directory "
          "(for a bucket, run each stage with launch/train.py --workdir=gs://...)", file=sys.stderr)
    sys.exit(2)
  quickstart.run(_CONFIG.value, _WORKDIR.value)


if __name__ == "__main__":
  flags.mark_flags_as_required(["config"])
  from jaxalign import errors

  errors.run_main(app.run, main)
