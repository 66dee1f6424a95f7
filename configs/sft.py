"""`configs/sft.py`: the sft config, installed with the package as `jaxalign.configs.sft` (read it there)."""

from jaxalign.configs.sft import *  # noqa: F401,F403
from jaxalign.configs.sft import get_config  # noqa: F401
