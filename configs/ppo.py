"""`configs/ppo.py`: the ppo config, installed with the package as `jaxalign.configs.ppo` (read it there)."""

from jaxalign.configs.ppo import *  # noqa: F401,F403
from jaxalign.configs.ppo import get_config  # noqa: F401
