"""`configs/reward.py`: the reward config, installed with the package as `jaxalign.configs.reward` (read it there)."""

from jaxalign.configs.reward import *  # noqa: F401,F403
from jaxalign.configs.reward import get_config  # noqa: F401
