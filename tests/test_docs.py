"""The README's and docs' code blocks run as written, so they cannot rot.

Python blocks run in-process, in order per file, with the placeholder checkpoint paths they name
(`/models/...`, `/path/to/...`) pointed at a tiny random-weight HF model and `/tmp/out` at a temporary folder.
Command lines (`launch/train.py`, `jaxalign train`) that need real models or hub datasets are not trained here;
each is checked against the stage's real config: every `--config.key=value` override applies (key exists,
value parses), and every other flag exists.
"""

import glob
import os
import re
import shlex

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DOCS = ["README.md"] + sorted(os.path.relpath(p, ROOT) for p in glob.glob(os.path.join(ROOT, "docs", "*.md")))
TRAIN_FLAGS = {"config", "workdir", "distributed", "coordinator", "num_processes", "process_id", "dry_run",
               "topology", "num_slices", "step_time", "verbose"}


def _blocks(doc: str, lang: str) -> list[str]:
  with open(os.path.join(ROOT, doc)) as f:
    return re.findall(rf"```{lang}\n(.*?)```", f.read(), re.S)


PY_DOCS = [d for d in DOCS if _blocks(d, "python")]


@pytest.mark.parametrize("doc", PY_DOCS)
def test_python_blocks_run(doc, tiny, tmp_path):
  for i, code in enumerate(_blocks(doc, "python")):
    code = re.sub(r"/(models|path/to)/[A-Za-z0-9._-]+", tiny["model"], code)
    code = code.replace('"/tmp/out"', repr(str(tmp_path / "out")))
    namespace = {"__name__": f"doc_{i}"}
    exec(compile(code, f"{doc} python block {i + 1}", "exec"), namespace)  # noqa: S102
    if "metrics" in namespace:  # A step ran: its metrics are finite numbers.
      import numpy as np
      assert all(np.all(np.isfinite(np.asarray(v))) for v in namespace["metrics"].values()), doc


def _commands(doc: str) -> list[list[str]]:
  out = []
  for block in _blocks(doc, "bash"):
    text = re.sub(r"\\\n\s*", " ", block)
    for line in text.splitlines():
      if line.strip().startswith("#") or not ("launch/train.py" in line or "jaxalign train" in line):
        continue
      lex = shlex.shlex(line.replace("$((8/F))", "1").replace("$F", "8").replace("$stage", "sft"), posix=True,
                        punctuation_chars=";&")
      lex.whitespace_split = True
      lex.commenters = "#"
      words: list[str] = []
      for w in list(lex) + [";"]:  # Commands joined by ; or && are checked one by one.
        if w in (";", "&&", "&"):
          if "launch/train.py" in words or words[:2] == ["jaxalign", "train"]:
            out.append(words)
          words = []
        else:
          words.append(w)
  return out


CMD_DOCS = [(d, i) for d in DOCS for i in range(len(_commands(d)))]


@pytest.mark.parametrize("doc,index", CMD_DOCS)
def test_train_commands_name_real_keys_and_flags(doc, index):
  from ml_collections import config_flags  # noqa: F401
  from jaxalign import configs
  import importlib.util

  words = _commands(doc)[index]
  args = [w for w in words if w.startswith("--")]
  config_arg = next(a.split("=", 1)[1] for a in args if a.startswith("--config="))
  file, _, variant = configs.path(config_arg).partition(":")
  spec = importlib.util.spec_from_file_location("doc_config", os.path.join(ROOT, file) if not
                                                os.path.isabs(file) else file)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  config = module.get_config(variant or None)
  for a in args:
    name, _, value = a[2:].partition("=")
    if name.startswith("config."):
      key = name[len("config."):]
      node = config
      *parents, leaf = key.split(".")
      for p in parents:
        assert p in node, f"{doc}: {a}: no group {p!r} in {config_arg}"
        node = node[p]
      assert leaf in node, f"{doc}: {a}: no key {key!r} in {config_arg}"
      with config.unlocked():  # The value parses as the key's type, as config_flags would do it.
        old = node[leaf]
        if isinstance(old, bool):
          assert value.lower() in ("true", "false", "1", "0"), f"{doc}: {a}"
        elif isinstance(old, (int, float)) and not isinstance(old, bool):
          float(value)
    else:
      assert name.split("=")[0] in TRAIN_FLAGS, f"{doc}: {a}: launch/train.py has no flag --{name}"
