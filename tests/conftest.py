"""Test setup: 8 CPU devices (real sharding), float32 matmuls, and helpers that build tiny HF checkpoints."""

import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import jax  # noqa: E402
import pytest  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")


@pytest.fixture(scope="session")
def hf_factory(tmp_path_factory):
  """Builds (and caches) a random-weight HF model directory for a family name."""
  from tests import hf_models

  cache = {}

  def make(family: str, **kw):
    key = (family, tuple(sorted(kw.items())))
    if key not in cache:
      path = tmp_path_factory.mktemp(f"hf_{family}")
      cache[key] = hf_models.save_random(family, str(path), **kw)
    return cache[key]

  return make
