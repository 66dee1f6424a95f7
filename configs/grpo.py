"""`configs/grpo.py`: the grpo config, installed with the package as `jaxalign.configs.grpo` (read it there)."""

from jaxalign.configs.grpo import *  # noqa: F401,F403
from jaxalign.configs.grpo import get_config  # noqa: F401
