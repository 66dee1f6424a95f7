"""Preemption (SIGTERM), hard kills (SIGKILL, also mid-save), NaN policies, and bad inputs with clear errors."""

import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import time

import numpy as np
import pytest

from jaxalign import checkpoint
from jaxalign.loops import driver, setup, sft
from jaxalign.loops.driver import NonFiniteError
from jaxalign.models import transformer
from jaxalign.models.config import preset
from tests.conftest import load_config

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
pytestmark = [pytest.mark.slow(100), pytest.mark.xdist_group("reliability")]
# This module's own compilation cache, empty at the start: the straight run compiles everything and the
# later runs of the same shapes load it (asserted below).
ENV = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=4", JAX_PLATFORMS="cpu",
           JAXALIGN_COMPILE_CACHE=tempfile.mkdtemp(prefix="jaxalign-cc-"))


def _cmd(tiny, wd, steps=40):
  return [sys.executable, "launch/train.py", "--config=configs/sft.py:tiny", f"--workdir={wd}",
          f"--config.model.init={tiny['model']}", f"--config.data.train={tiny['train']}",
          f"--config.data.eval={tiny['eval']}", f"--config.train.steps={steps}", "--config.checkpoint.every=2",
          "--config.logging.every=1", "--config.eval.every=0", "--config.logging.progress=false",
          "--config.logging.tensorboard=false", "--config.train.batch_size=4"]


def _train_losses(wd):
  out = {}
  with open(os.path.join(wd, "metrics.jsonl")) as f:
    for r in map(json.loads, f):
      if r["split"] == "train":  # Each step once: a resumed run drops the rows it replays (issue 21).
        assert r["step"] not in out, f"step {r['step']} twice in metrics.jsonl"
        out[r["step"]] = r["loss"]
  return out


@pytest.fixture(scope="module")
def straight(tiny, tmp_path_factory):
  wd = str(tmp_path_factory.mktemp("straight") / "run")
  out = subprocess.run(_cmd(tiny, wd), cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=600)
  assert out.returncode == 0, out.stderr[-2000:]
  return wd


def _wait_for_rows(wd, n, proc, timeout=300):
  t = time.time()
  while time.time() - t < timeout:
    if proc.poll() is not None:
      return
    try:
      with open(os.path.join(wd, "metrics.jsonl")) as f:
        if sum(1 for _ in f) >= n:
          return
    except FileNotFoundError:
      pass
    time.sleep(0.2)


def test_sigterm_saves_exits_zero_and_resumes(tiny, straight, tmp_path):
  wd = str(tmp_path / "run")
  proc = subprocess.Popen(_cmd(tiny, wd), cwd=ROOT, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                          text=True)
  _wait_for_rows(wd, 7, proc)
  proc.send_signal(signal.SIGTERM)
  out, _ = proc.communicate(timeout=300)
  assert proc.returncode == 0, out[-2000:]
  assert "preempted at step" in out and "rerun the same command to resume" in out
  saved = checkpoint.Checkpointer(os.path.join(wd, "checkpoints")).latest_step()
  assert 7 <= saved < 40
  assert max(_train_losses(wd)) == saved  # The step in flight finished and was saved.
  rerun = subprocess.run(_cmd(tiny, wd), cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=600)
  assert rerun.returncode == 0
  assert _train_losses(wd) == _train_losses(straight)
  # Compile once: the resumed run found every program in the persistent cache the straight run filled.
  first, again = (_summary(w) for w in (straight, wd))
  assert first["compile_cache_misses"] > 0 and first["compile_seconds"] > 0
  # Every program the straight run compiled is loaded; the resumed run compiles only its restore-only program
  # (one miss, ~2 s here), so its compile time is well under half (a plain rerun: under a tenth, docs).
  assert again["compile_cache_hits"] >= first["compile_cache_misses"] and again["compile_cache_misses"] <= 1
  assert again["compile_seconds"] < 0.5 * first["compile_seconds"], (first, again)


def _summary(wd):
  with open(os.path.join(wd, "metrics.jsonl")) as f:
    return [r for r in map(json.loads, f) if r["split"] == "summary"][-1]


def test_sigkill_at_random_points_resumes_to_identical_params(tiny, straight, tmp_path):
  wd = str(tmp_path / "run")
  rng = random.Random(0)
  kills = 0
  for _ in range(5):
    proc = subprocess.Popen(_cmd(tiny, wd), cwd=ROOT, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    _wait_for_rows(wd, 1, proc)  # Past start-up, so the kill lands in training or in a checkpoint save.
    time.sleep(rng.uniform(0.0, 2.5))
    if proc.poll() is not None:
      break
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    kills += 1
  final = subprocess.run(_cmd(tiny, wd), cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=600)
  assert final.returncode == 0, final.stderr[-2000:]
  assert kills >= 3
  assert _train_losses(wd) == _train_losses(straight)
  a = open(os.path.join(wd, "export", "hf", "model.safetensors"), "rb").read()
  b = open(os.path.join(straight, "export", "hf", "model.safetensors"), "rb").read()
  assert a == b  # Final params identical to the uninterrupted run, bit for bit.


class _NaNAt:
  """Wraps a batch iterator and poisons the batch of one step (its loss weights become NaN)."""

  def __init__(self, it, at):
    self.it, self.at, self.n = it, at, 0

  def __getattr__(self, k):
    return getattr(self.it, k)

  def __next__(self):
    b = next(self.it)
    self.n += 1
    if self.n == self.at:
      b = dict(b, weights=np.where(b["weights"] > 0, np.nan, 0).astype(np.float32))
    return b


def _nan_run(tiny, wd, policy):
  cfg = load_config("sft", "tiny", model__init=tiny["model"], data__train=tiny["train"], data__eval=tiny["eval"],
                    train__steps=8, train__nan_policy=policy, checkpoint__every=2, eval__every=0,
                    logging__every=1, logging__progress=False, logging__tensorboard=False, export__hf=False,
                    train__batch_size=8)
  parts = sft.build(cfg, wd)
  parts.batches = _NaNAt(parts.batches, at=5)
  parts.evaluate = None
  return driver.run(parts, cfg, wd)


def test_nan_batch_skip_policy(tiny, tmp_path):
  state = _nan_run(tiny, str(tmp_path / "skip"), "skip")
  assert int(state.step) == 8 and int(state.skipped) == 1
  import jax
  assert all(np.isfinite(np.asarray(x)).all() for x in jax.tree.leaves(state.params))


def test_nan_batch_stop_policy_keeps_last_good_checkpoint(tiny, tmp_path):
  wd = str(tmp_path / "stop")
  with pytest.raises(NonFiniteError, match=r"non-finite loss or gradient at step 5 .* last good checkpoint \(4\)"):
    _nan_run(tiny, wd, "stop")
  ck = checkpoint.Checkpointer(os.path.join(wd, "checkpoints"))
  assert ck.latest_step() == 4
  params, step = checkpoint.restore_params_from_run(wd, {"model": _abstract(wd)})
  assert step == 4
  import jax
  assert all(np.isfinite(np.asarray(x)).all() for x in jax.tree.leaves(params))


def _abstract(wd):
  cfg = checkpoint.model_config_from_dict(checkpoint.read_run_info(wd)["model_config"])
  return transformer.abstract_params(cfg)[0]


# ----------------------------------------------------------------------------------------------- bad input

def test_vocab_that_does_not_fit_the_model(tiny):
  import transformers
  tok = transformers.AutoTokenizer.from_pretrained(tiny["tokenizer"])
  with pytest.raises(ValueError, match=r"model.tokenizer: tokenizer has \d+ tokens but the model's vocab_size is 64"):
    setup.check_vocab(preset("tiny", vocab_size=64), tok, "model.tokenizer")


def test_checkpoint_architecture_mismatch(task_sft):
  other = transformer.abstract_params(preset("small", vocab_size=512))[0]
  with pytest.raises(ValueError, match="does not match the configured architecture"):
    checkpoint.restore_params_from_run(task_sft["sft"], {"model": other})


def test_batch_not_divisible_by_data_axes(tiny):
  cfg = load_config("sft", "tiny", train__batch_size=6, mesh__data=4, mesh__fsdp=2)
  with pytest.raises(ValueError, match=r"train.batch_size=6 is not divisible by the data-parallel size"):
    setup.make_mesh(cfg)


def test_preference_stage_given_prompt_only_data_names_the_fields(tiny, tmp_path):
  """It ended in KeyError: 'chosen' inside tokenisation."""
  from jaxalign.data import datasets
  from jaxalign.data.sources import DataError
  path = tmp_path / "prompts.jsonl"
  path.write_text("".join(json.dumps({"prompt": f"the movie {i}"}) + "\n" for i in range(20)))
  cfg = load_config("dpo", "tiny", data__train=str(path), model__tokenizer=tiny["tokenizer"])
  import transformers
  tok = transformers.AutoTokenizer.from_pretrained(tiny["tokenizer"])
  with pytest.raises(DataError, match=r"prompts.jsonl line \d+: a preference stage needs 'chosen' and 'rejected'"):
    datasets.pair_examples(cfg, tok)


def test_unknown_loss_type_is_refused_before_any_model_loads(tmp_path):
  """It was caught only after the models loaded, and the list of valid types left out kto."""
  from jaxalign.loops import dpo
  cfg = load_config("dpo", "tiny", loss__type="sigmod", model__init=str(tmp_path / "does_not_exist"))
  with pytest.raises(ValueError, match=r"loss.type='sigmod': expected one of sigmoid, .*orpo or kto"):
    dpo.build(cfg, str(tmp_path / "wd"))


def test_missing_field_and_empty_prompt():
  from jaxalign.data import formats
  from jaxalign.data.sources import DataError
  with pytest.raises(DataError, match=r"f row 3: missing field 'completion'"):
    formats.validate({"prompt": "a"}, "prompt_completion", "f row 3")
  with pytest.raises(DataError, match=r"f row 0: field 'prompt' is empty"):
    formats.validate({"prompt": " "}, "prompt", "f row 0")


def test_text_that_tokenizes_to_nothing(tiny):
  import transformers
  from jaxalign.data import examples
  from jaxalign.data.sources import DataError
  tok = transformers.AutoTokenizer.from_pretrained(tiny["tokenizer"])
  with pytest.raises(DataError, match="f row 2: record tokenizes to no trainable tokens"):
    examples.sft_example(tok, {"prompt": "a", "completion": ""}, "prompt_completion", "f row 2",
                         completion_only=True, add_eos=False)
