"""A user's mistake is one line naming the key (file, 1-based line) and the fix, exit code 2, no traceback;
`--verbose` brings the traceback back. One test per message issue 21 observed."""

import os
import shutil
import subprocess
import sys

import pytest

from jaxalign import errors
from jaxalign.data import datasets, examples, sources
from jaxalign.data.sources import DataError
from jaxalign.loops import setup
from jaxalign.paths import PathError
from tests import fixtures
from tests.conftest import load_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _train(*args, timeout=180):
  return subprocess.run([sys.executable, "launch/train.py", "--config=configs/sft.py:tiny", *args], cwd=ROOT,
                        capture_output=True, text=True, timeout=timeout)


def test_typo_in_a_config_key_is_one_line_with_the_fix():
  out = _train("--workdir=/tmp/unused", "--config.train.stepz=3")
  assert out.returncode == errors.EXIT_USER_ERROR
  assert "Traceback" not in out.stderr + out.stdout
  assert out.stderr.strip().splitlines()[-1] == (
      "error: --config.train.stepz: configs/sft.py:tiny has no key train.stepz (did you mean train.steps?)")
  group = _train("--workdir=/tmp/unused", "--config.trainn.steps=3")
  assert "has no key trainn.steps (did you mean train.steps?)" in group.stderr


def test_verbose_shows_the_traceback():
  out = _train("--workdir=/tmp/unused", "--config.train.stepz=3", "--verbose")
  assert out.returncode not in (0, errors.EXIT_USER_ERROR)
  assert "Traceback" in out.stderr and "stepz" in out.stderr


def test_missing_model_init_names_model_init_before_anything_loads(tmp_path):
  missing = str(tmp_path / "no_such_model")
  out = _train(f"--workdir={tmp_path / 'run'}", f"--config.model.init={missing}")
  assert out.returncode == errors.EXIT_USER_ERROR, out.stderr[-2000:]
  assert "Traceback" not in out.stderr + out.stdout
  assert f"error: model.init={missing}: not found (no such file or directory)" in out.stdout
  assert "Repo id" not in out.stdout + out.stderr
  assert not os.path.exists(tmp_path / "run" / "checkpoints")


def test_local_paths_are_checked_but_hub_ids_are_left_to_their_loaders(tmp_path):
  cfg = load_config("sft", data__train=str(tmp_path / "nope.jsonl"))
  with pytest.raises(PathError, match=r"data.train=.*nope.jsonl: not found"):
    setup.check_inputs(cfg)
  cfg = load_config("sft", data__train="org/some-dataset", model__init="org/some-model")
  setup.check_inputs(cfg)  # Could be hub ids: not refused here.


def test_a_tokenizer_from_model_init_names_model_init(tmp_path):
  (tmp_path / "m").mkdir()
  cfg = load_config("sft", model__init=str(tmp_path / "m"))
  with pytest.raises(errors.ConfigError, match=r"^model.init=.*/m: could not load a Hugging Face tokenizer"):
    setup.load_tokenizer(cfg)


def test_empty_data_file_says_so(tmp_path):
  path = tmp_path / "empty.jsonl"
  path.write_text("")
  with pytest.raises(DataError, match=r"data.train=.*empty.jsonl: the file is empty \(0 bytes\)"):
    sources.load_records(str(path))
  bad = tmp_path / "bad.jsonl"
  bad.write_text('{"prompt": "a", "completion": "b"}\n{not json\n')
  with pytest.raises(DataError, match=r"bad.jsonl: could not be read as json: \S"):
    sources.load_records(str(bad))


def test_every_record_truncated_is_an_error_not_a_silent_run(tmp_path):
  tok = fixtures.make_tokenizer(str(tmp_path / "tok"))
  path = fixtures.write_jsonl(str(tmp_path / "long.jsonl"), fixtures.prompt_completion_rows(20))
  cfg = load_config("sft", data__train=path, data__eval_fraction=0.0)

  def make(r, w):
    return examples.sft_example(tok, r, "prompt_completion", w, completion_only=True, add_eos=True)

  with pytest.raises(DataError, match=r"every one of the 20 records is longer than train.seq_len"):
    datasets.train_eval(cfg.data, make, length=len, truncated=lambda e: True, seed=0)


def test_config_errors_are_user_errors_and_value_errors():
  assert issubclass(errors.ConfigError, ValueError) and issubclass(DataError, errors.UserError)
  assert issubclass(PathError, errors.UserError)
  cfg = load_config("dpo", loss__type="nope")
  from jaxalign.loops import dpo
  with pytest.raises(errors.ConfigError, match="kto"):
    dpo.build(cfg, "/tmp/unused")


@pytest.mark.parametrize("key,value,match", [("attention", "bogus", r"model\.attention='bogus': expected auto"),
                                             ("moe_impl", "fast", r"model\.moe_impl='fast': expected auto"),
                                             ("remat", "some", r"model\.remat='some': expected none")])
def test_a_bad_model_value_names_its_key(key, value, match):
  cfg = load_config("sft", "tiny", **{f"model__{key}": value})
  with pytest.raises(errors.ConfigError, match=match):
    setup.resolve_model_config("", cfg.model)


def test_console_command_runs_outside_the_checkout(tmp_path):
  """`jaxalign train --config=<stage name>` finds the installed config from any directory (no configs/ there)."""
  exe = shutil.which("jaxalign")
  assert exe, "the package installs a `jaxalign` console script (pip install -e .)"
  env = {k: v for k, v in os.environ.items() if k != "JAX_PLATFORMS"}  # As a user's shell: nothing chosen.
  out = subprocess.run([exe, "train", "--config=sft:tiny", f"--workdir={tmp_path / 'dry'}", "--dry_run"],
                       cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
  assert out.returncode == 0, out.stderr[-3000:]
  assert "train_step: peak" in out.stdout and (tmp_path / "dry" / "plan.json").exists()
  # libtpu (installed with the test extra) is not asked for a TPU this machine does not have: no init noise.
  assert "TPU_ACCELERATOR_TYPE" not in out.stderr and "jellyfish" not in out.stderr
  bad = subprocess.run([exe, "trian"], cwd=tmp_path, capture_output=True, text=True, timeout=60)
  assert bad.returncode == errors.EXIT_USER_ERROR and "unknown command 'trian'" in bad.stderr


def test_configs_are_importable():
  from jaxalign import configs
  from jaxalign.configs import dpo
  assert dpo.get_config("tiny").loss.type == "sigmoid"
  assert configs.path("dpo:tiny").endswith(os.path.join("jaxalign", "configs", "dpo.py:tiny"))
  assert configs.path("my/own.py") == "my/own.py"


def test_small_size_is_the_quickstart_tested_recipe():
  """`:small` gives a small-model user the hyperparameters the quickstart trains with (no flags to copy)."""
  from jaxalign.config import SMALL
  from jaxalign.configs import quickstart
  import importlib

  qs = quickstart.get_config()
  for stage, keys in SMALL.items():
    cfg = importlib.import_module(f"jaxalign.configs.{stage}").get_config("small")
    for key, value in keys.items():
      group, name = key.split(".")
      assert cfg[group][name] == value == qs[stage][group][name], (stage, key)


def test_expected_orbax_warnings_are_filtered_and_others_kept():
  import logging

  from jaxalign import launch_utils

  def rec(msg, level=logging.WARNING, path="/x/orbax/checkpoint/checkpoint_manager.py"):
    return logging.LogRecord("absl", level, path, 1, msg, None, None)

  assert not launch_utils._keep(rec('Item "opt_state" was found in the checkpoint, but could not be restored.'))
  assert not launch_utils._keep(rec("Given directory is read only=/runs/sft/checkpoints"))
  assert not launch_utils._keep(rec("Saving item to /x", level=logging.INFO))
  assert launch_utils._keep(rec("Checkpoint save failed: disk full"))  # A real orbax warning stays.
  assert launch_utils._keep(rec("anything", path="/x/jaxalign/loops/driver.py"))
