"""Records -> validated, deduplicated, tokenised examples with a data report; and what each stage reads."""

from __future__ import annotations

import collections
import dataclasses
import json
import logging
from typing import Any, Callable

import numpy as np

from jaxalign.data import formats, sources
from jaxalign.data.sources import DataError


@dataclasses.dataclass
class Report:
  """What happened to the data before training, written to WORKDIR/data_report.json."""

  split: str
  source: str
  format: str = ""
  rows_read: int = 0
  kept: int = 0
  dropped: dict = dataclasses.field(default_factory=collections.Counter)
  truncated: int = 0
  lengths: list = dataclasses.field(default_factory=list)

  def summary(self) -> dict[str, Any]:
    pct = {}
    if self.lengths:
      q = np.percentile(self.lengths, [50, 90, 99, 100])
      pct = {"p50": int(q[0]), "p90": int(q[1]), "p99": int(q[2]), "max": int(q[3])}
    return {"split": self.split, "source": self.source, "format": self.format, "rows_read": self.rows_read,
            "kept": self.kept, "dropped": dict(self.dropped), "truncated": self.truncated, "tokens": pct}

  def __str__(self):
    s = self.summary()
    return (f"data[{s['split']}] {s['source']} ({s['format']}): read {s['rows_read']}, kept {s['kept']}, "
            f"dropped {s['dropped'] or 0}, truncated {s['truncated']}, token lengths {s['tokens']}")


def _freeze(x):
  return json.dumps(x, sort_keys=True, default=str)


def load_split(data_cfg, spec: str, split_name: str, config_key: str):
  ds = sources.load_records(spec, data_cfg.split, config_key)
  if data_cfg.max_records:
    ds = ds.select(range(min(len(ds), data_cfg.max_records)))
  fmt = data_cfg.format if data_cfg.format != "auto" else formats.detect(ds.column_names, f"{config_key}={spec}")
  if fmt not in formats.FORMATS:
    raise DataError(f"data.format={fmt!r}: expected auto or one of {formats.FORMATS}")
  return ds, fmt


def process(ds, fmt: str, spec: str, split_name: str, data_cfg, make: Callable[[dict, str], Any],
            *, length: Callable[[Any], int], truncated: Callable[[Any], bool],
            limit: str = "train.seq_len") -> tuple[list, Report]:
  """Validate, dedup, expand ranked rows, tokenise with `make(row, where)`; bad rows raise or are skipped."""
  rep = Report(split=split_name, source=spec, format=fmt)
  seen: set[str] = set()
  out = []
  unit = "line" if str(spec).lower().endswith(".jsonl") else "row"
  for i, raw in enumerate(ds):
    rep.rows_read += 1
    where = f"{spec} {unit} {i + 1}"  # 1-based, as editors count lines.
    try:
      row = formats.validate(raw, fmt, where)
    except DataError as e:
      if data_cfg.bad_rows != "skip":
        raise DataError(f"{e} (set data.bad_rows=skip to skip such rows)") from None
      rep.dropped["invalid: " + str(e).split(": ", 1)[-1][:60]] += 1
      continue
    rows = formats.expand_ranked(row) if fmt == "ranked" else [row]
    for r in rows:
      if data_cfg.dedup:
        key = _freeze(r)
        if key in seen:
          rep.dropped["duplicate"] += 1
          continue
        seen.add(key)
      try:
        ex = make(r, where)
      except DataError as e:
        if data_cfg.bad_rows != "skip":
          raise
        rep.dropped["tokenize: " + str(e).split(": ", 1)[-1][:60]] += 1
        continue
      if ex is None:
        rep.dropped["too long"] += 1
        continue
      rep.truncated += int(truncated(ex))
      rep.lengths.append(length(ex))
      out.append(ex)
  rep.kept = len(out)
  if not out:
    raise DataError(f"{spec}: no usable records ({rep})")
  if rep.truncated == rep.kept:  # Every record cut: the model would never see a whole example.
    raise DataError(f"{spec}: every one of the {rep.kept} records is longer than {limit} and was truncated "
                    f"(longest {max(rep.lengths)} tokens kept); raise {limit}")
  return out, rep


def train_eval(data_cfg, make: Callable[[dict, str], Any], *, length, truncated, seed: int,
               limit: str = "train.seq_len"):
  """(train examples, eval examples, [reports]); eval is data.eval or a held-out fraction of train."""
  ds, fmt = load_split(data_cfg, data_cfg.train, "train", "data.train")
  train, rep = process(ds, fmt, data_cfg.train, "train", data_cfg, make, length=length, truncated=truncated,
                       limit=limit)
  reports = [rep]
  if data_cfg.eval:
    eds, efmt = load_split(data_cfg, data_cfg.eval, "eval", "data.eval")
    evals, erep = process(eds, efmt, data_cfg.eval, "eval", data_cfg, make, length=length, truncated=truncated,
                          limit=limit)
    reports.append(erep)
  elif data_cfg.eval_fraction > 0:
    n_eval = max(1, int(round(len(train) * data_cfg.eval_fraction)))
    if n_eval >= len(train):
      raise DataError(f"data.train={data_cfg.train}: {len(train)} examples are too few to hold out "
                      f"data.eval_fraction={data_cfg.eval_fraction}")
    perm = np.random.default_rng([seed, 7919]).permutation(len(train))
    evals = [train[i] for i in sorted(perm[:n_eval])]
    train = [train[i] for i in sorted(perm[n_eval:])]
    rep.kept = len(train)
    held = Report(split="eval", source=f"held out from {data_cfg.train} (data.eval_fraction="
                  f"{data_cfg.eval_fraction})", format=fmt, rows_read=n_eval, kept=n_eval,
                  lengths=[length(e) for e in evals])
    reports.append(held)
  else:
    evals = []
  for r in reports:
    logging.info("%s", r)
  return train, evals, reports


# ----------------------------------------------------------------------------------------------- per stage

def sft_examples(config, tok):
  """Tokenised SFT train/eval examples and data reports (text, prompt/completion or messages records)."""
  from jaxalign.data import examples
  d = config.data

  def make(row, where):
    ex = examples.sft_example(tok, row, _sft_format(row), where, completion_only=d.completion_only,
                              add_eos=d.add_eos)
    return examples.fit_length(ex, config.train.seq_len, d.too_long, where)

  return train_eval(d, make, length=len, truncated=lambda e: e.truncated, seed=config.seed)


def _sft_format(row: dict) -> str:
  if "messages" in row:
    return "messages"
  if "completion" in row:
    return "prompt_completion"
  return "text"


def max_prompt_len(config) -> int:
  """Pairs keep at most this many prompt tokens (their end) when too long for train.seq_len."""
  return config.data.max_prompt_len or config.train.seq_len // 2


def pair_examples(config, tok):
  """Preference pairs (from prompt/chosen/rejected, implicit-prompt, ranked or rated records)."""
  from jaxalign.data import examples
  d = config.data

  def make(row, where):
    return examples.pair_example(tok, row, where, seq_len=config.train.seq_len,
                                 max_prompt_len=max_prompt_len(config), add_eos=d.add_eos, too_long=d.too_long)

  return train_eval(d, make, length=len, truncated=lambda p: p.truncated, seed=config.seed)


def unpaired_examples(config, tok):
  """KTO: (prompt, completion, label) rows -> pairs of (completion, KL-baseline row) with labels."""
  from jaxalign.data import examples
  ident = lambda row, where: (row, where)  # noqa: E731
  train, evals, reports = train_eval(config.data, ident, length=lambda x: 0, truncated=lambda x: False,
                                     seed=config.seed)
  kw = dict(seq_len=config.train.seq_len, max_prompt_len=max_prompt_len(config), add_eos=config.data.add_eos)
  train = examples.kto_examples(tok, train, **kw)
  evals = examples.kto_examples(tok, evals, **kw) if evals else []
  for r, exs in zip(reports, (train, evals)):
    r.lengths = [len(e) for e in exs]
    r.truncated = sum(e.truncated for e in exs)
  return train, evals, reports


def prompt_examples(config, tok, prompt_len: int):
  """Prompt ids (their last `prompt_len` tokens) from any record with a `prompt` field (prompt-only, SFT or
  preference data); each keeps the record's prompt as `text`."""
  from jaxalign.data import examples
  d = config.data.copy_and_resolve_references()
  with d.unlocked():
    d.format = "prompt"

  def make(row, where):
    ids = examples.prompt_ids(tok, row["prompt"], where)
    ex = examples.Example(ids[-prompt_len:], np.zeros(min(len(ids), prompt_len), bool),
                          truncated=len(ids) > prompt_len)
    ex.text = row["prompt"]  # The record's prompt as written: what reward functions see, in training and eval.
    ex.columns = {k: v for k, v in row.items() if k != "prompt"}
    return ex

  return train_eval(d, make, length=len, truncated=lambda e: e.truncated, seed=config.seed,
                    limit="rollout.prompt_len")
