"""The stage configs, importable and installed with the package: `jaxalign.configs.<stage>.get_config(variant)`.

`configs/<stage>.py` in a checkout re-exports these, so `--config=configs/sft.py` and `jaxalign train
--config=sft` load the same file. `path(name)` resolves a bare stage name to its file here.
"""

from __future__ import annotations

import os

STAGE_CONFIGS = ("sft", "reward", "dpo", "ppo", "grpo", "evaluate", "quickstart")


def path(name: str) -> str:
  """The file of a config given as a stage name (`sft`, `dpo:tiny`) or a path (returned as given)."""
  base, sep, variant = name.partition(":")
  if base in STAGE_CONFIGS:
    return os.path.join(os.path.dirname(os.path.abspath(__file__)), f"{base}.py") + sep + variant
  return name
