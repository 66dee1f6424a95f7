"""`configs/dpo.py`: the dpo config, installed with the package as `jaxalign.configs.dpo` (read it there)."""

from jaxalign.configs.dpo import *  # noqa: F401,F403
from jaxalign.configs.dpo import get_config  # noqa: F401
