"""jaxalign: JAX-native alignment of language models (SFT, reward models, the DPO family, PPO, GRPO)."""

import os as _os

# jaxalign uses transformers for tokenizers, configs and checkpoint files only, never its PyTorch models: its
# "PyTorch was not found" advisory at import is noise here (a user's own setting of the variable wins).
_os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
