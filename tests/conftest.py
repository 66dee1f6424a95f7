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


@pytest.fixture(scope="session")
def tiny(tmp_path_factory):
  """Tokenizer, random HF Llama and messages datasets, built once per session."""
  from tests.fixtures import tiny_setup

  return tiny_setup(str(tmp_path_factory.mktemp("tiny")))


def load_config(name: str, variant: str | None = None, **overrides):
  """A stage's real default config (configs/<name>.py), with dotted overrides."""
  import importlib.util

  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  spec = importlib.util.spec_from_file_location(f"configs_{name}", os.path.join(root, "configs", f"{name}.py"))
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  cfg = mod.get_config(variant)
  for key, value in overrides.items():
    node = cfg
    parts = key.split("__")
    for p in parts[:-1]:
      node = node[p]
    node[parts[-1]] = value
  return cfg
