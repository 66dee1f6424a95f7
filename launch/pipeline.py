"""Chain stages: SFT -> reward model -> DPO / PPO / GRPO -> evaluation -> report; `jaxalign pipeline` is the same.

  python launch/pipeline.py --config=configs/quickstart.py --workdir=runs/quickstart
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

if __name__ == "__main__":
  from jaxalign import cli

  cli.pipeline()
