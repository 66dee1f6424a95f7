"""Test setup: 8 CPU devices (real sharding), float32 matmuls, and helpers that build tiny HF checkpoints."""

import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
# One compilation cache for the session (in-process runs and every CLI subprocess): tests that build the same
# shapes load each other's programs, and nothing is left in the user's cache.
import tempfile  # noqa: E402

os.environ.setdefault("JAXALIGN_COMPILE_CACHE", tempfile.mkdtemp(prefix="jaxalign-test-cc-"))

import jax  # noqa: E402
import pytest  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")

from jaxalign import compile_cache  # noqa: E402

compile_cache.enable()


def pytest_xdist_auto_num_workers(config):
  """How many workers `-n auto` (pyproject.toml) starts. One process leaves a core idle for a third of the
  suite (XLA compiles on one thread; subprocess runs start Python and JAX on one): two workers on 2 cores fill
  it. Past four, each more worker only builds the session fixtures again."""
  return max(1, min(4, os.cpu_count() or 1))


def pytest_collection_modifyitems(items):
  """Longest first (`@pytest.mark.slow(seconds)`, the seconds it takes alone on 2 cores): spread over workers,
  the minute-long subprocess runs start at once instead of leaving one worker on them alone at the end. The
  sort is stable, so a module's tests stay together (its module fixtures are set up once)."""

  def seconds(item):
    mark = item.get_closest_marker("slow")
    return -(mark.args[0] if mark and mark.args else 0)

  items.sort(key=seconds)


@pytest.fixture(scope="session")
def hf_factory(tmp_path_factory):
  """Builds (and caches) a random-weight HF model directory for a family name."""
  from tests import hf_models

  cache = {}

  def make(family: str, **kw):
    key = (family, repr(sorted(kw.items())))
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
  """A stage's real default config (configs/<name>.py), with dotted overrides.

  Without mesh overrides the mesh is data-parallel over the 8 devices (mesh.data=-1, mesh.fsdp=1): on 2 CPU
  cores FSDP's per-layer all-gathers across 8 fake devices make learning tests ~1.5x slower, and the FSDP
  path has its own tests (explicit meshes here, the CLI and multi-process runs)."""
  if not any(k.startswith("mesh__") for k in overrides):
    overrides = {"mesh__data": -1, "mesh__fsdp": 1, **overrides}
  # In-process runs skip the end-of-run report's plot (matplotlib, ~2 s a run); its own test turns it on.
  overrides = {"logging__report": False, **overrides}
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
  from jaxalign.loops import stages

  root = tmp_path_factory.mktemp("task")
  paths = reviews.write_task(str(root / "data"), n_sft=2000, n_pref=1500, n_prompts=256, n_eval=200)
  cfg = load_config("sft", "tiny", model__tokenizer=paths["tokenizer"], data__train=paths["sft_train"],
                    data__eval=paths["sft_eval"], train__steps=150, train__batch_size=16, eval__every=150,
                    checkpoint__every=150, logging__progress=False, logging__tensorboard=False, export__hf=False)
  stages.train(cfg, str(root / "sft"))
  return {**paths, "sft": str(root / "sft"), "root": str(root)}


@pytest.fixture(scope="session")
def task_rm(task_sft, tmp_path_factory):
  """A reward model trained from the task's SFT run through the CLI (FSDP over 8 devices), with its HF export;
  shared by the online-RL tests and checked itself in test_preference_runs."""
  import subprocess
  import sys

  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  wd = str(tmp_path_factory.mktemp("rm") / "rm")
  cmd = [sys.executable, "launch/train.py", "--config=configs/reward.py:tiny", f"--workdir={wd}",
         f"--config.model.init={task_sft['sft']}", f"--config.data.train={task_sft['pref_train']}",
         f"--config.data.eval={task_sft['pref_eval']}", "--config.train.steps=150", "--config.train.batch_size=16",
         "--config.eval.every=75", "--config.logging.progress=false", "--config.logging.tensorboard=false"]
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8", JAX_PLATFORMS="cpu")
  out = subprocess.run(cmd, cwd=root, env=env, capture_output=True, text=True, timeout=900)
  assert out.returncode == 0, out.stderr[-3000:]
  return wd
