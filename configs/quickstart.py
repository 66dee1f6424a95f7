"""`configs/quickstart.py`: the quickstart config, installed with the package as `jaxalign.configs.quickstart` (read it there)."""

from jaxalign.configs.quickstart import *  # noqa: F401,F403
from jaxalign.configs.quickstart import get_config  # noqa: F401
