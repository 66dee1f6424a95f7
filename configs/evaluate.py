"""`configs/evaluate.py`: the evaluate config, installed with the package as `jaxalign.configs.evaluate` (read it there)."""

from jaxalign.configs.evaluate import *  # noqa: F401,F403
from jaxalign.configs.evaluate import get_config  # noqa: F401
