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


@pytest.fixture(scope="session")
def task_sft(tmp_path_factory):
  """The reviews task and a tiny SFT run trained from scratch on it (shared by preference and RL tests)."""
  from jaxalign.data.tasks import reviews
  from jaxalign.loops import offline

  root = tmp_path_factory.mktemp("task")
  paths = reviews.write_task(str(root / "data"), n_sft=2000, n_pref=1500, n_prompts=256, n_eval=200)
  cfg = load_config("sft", "tiny", model__tokenizer=paths["tokenizer"], data__train=paths["sft_train"],
                    data__eval=paths["sft_eval"], train__steps=150, train__batch_size=16, eval__every=150,
                    checkpoint__every=150, logging__progress=False, logging__tensorboard=False, export__hf=False)
  offline.train_sft(cfg, str(root / "sft"))
  return {**paths, "sft": str(root / "sft"), "root": str(root)}


@pytest.fixture(scope="session")
def task_rm(task_sft, tmp_path_factory):
  """A reward model trained from the task's SFT run (shared by the online-RL tests)."""
  from jaxalign.loops import preference

  wd = str(tmp_path_factory.mktemp("rm") / "rm")
  cfg = load_config("reward", "tiny", model__init=task_sft["sft"], data__train=task_sft["pref_train"],
                    data__eval=task_sft["pref_eval"], train__steps=150, train__batch_size=16, eval__every=150,
                    logging__progress=False, logging__tensorboard=False, export__hf=False)
  preference.train_reward(cfg, wd)
  return wd
