"""Thin entry point: flags -> (jax.distributed) -> train(config, workdir); `jaxalign train` is the same.

  python launch/train.py --config=configs/sft.py --workdir=runs/sft --config.optimizer.learning_rate=1e-5
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

if __name__ == "__main__":
  from jaxalign import cli

  cli.train()
