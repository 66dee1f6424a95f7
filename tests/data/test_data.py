"""Data pipeline: formats, boundary policy, masks (property-based), truncation, errors naming file and row."""

import json
import os

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from jaxalign.data import batching, datasets, examples, formats, sources
from jaxalign.data.sources import DataError
from tests import fixtures
from tests.conftest import load_config

pytestmark = pytest.mark.xdist_group("data")  # Its module fixture is built once.


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
  return fixtures.make_tokenizer(str(tmp_path_factory.mktemp("tok")))


def test_prompt_completion_boundary_is_the_text_boundary(tok):
  ex = examples.sft_example(tok, {"prompt": "the movie was", "completion": " really good"}, "prompt_completion",
                            "x", completion_only=True, add_eos=True)
  p = examples.prompt_ids(tok, "the movie was", "x")
  np.testing.assert_array_equal(ex.ids[:len(p)], p)  # The sampler's prompt ids are a prefix.
  assert not ex.trained[:len(p)].any() and ex.trained[len(p):].all()
  assert ex.ids[-1] == tok.eos_token_id


def test_chat_masks_only_assistant_turns(tok):
  msgs = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "good film"},
          {"role": "assistant", "content": "film good"}, {"role": "user", "content": "bad plot"},
          {"role": "assistant", "content": "plot bad"}]
  ex = examples.sft_example(tok, {"messages": msgs}, "messages", "x", completion_only=True, add_eos=True)
  text_trained = tok.decode(ex.ids[ex.trained])
  assert "film good" in text_trained and "plot bad" in text_trained
  assert "good film" not in text_trained and "be brief" not in text_trained and "user" not in text_trained
  assert tok.decode(ex.ids) == tok.apply_chat_template(msgs, tokenize=False)


@settings(max_examples=40, deadline=None)
@given(st.lists(st.tuples(st.text(alphabet="abc xyz", min_size=0, max_size=12),
                          st.text(alphabet="abc xyz!", min_size=1, max_size=12).filter(str.strip)),
                min_size=1, max_size=6),
       st.integers(8, 40))
def test_property_masks_never_cover_prompts_and_packing_never_crosses(tok, pairs, seq_len):
  exs = []
  for p, c in pairs:
    ex = examples.sft_example(tok, {"prompt": p, "completion": c}, "prompt_completion", "x",
                              completion_only=True, add_eos=True)
    n_prompt = len(examples.encode_segments(tok, [(p, False)] if p else [], bos=False, eos=False).ids)
    assert not ex.trained[:n_prompt].any()
    ex = examples.fit_length(ex, seq_len, "truncate", "x")
    if ex is not None:
      exs.append(ex)
  if not exs:
    return
  rows = batching.pack_rows([len(e) for e in exs], range(len(exs)), seq_len)
  assert sorted(i for r in rows for i in r) == list(range(len(exs)))
  for r in rows:
    b = batching.build_row([exs[i] for i in r], seq_len)
    seg = b["segment_ids"]
    for t in np.nonzero(b["weights"])[0]:
      assert seg[t] == seg[t + 1] != 0  # A trained target is always in its own example.


def test_errors_name_file_and_row(tmp_path, tok):
  path = fixtures.write_jsonl(str(tmp_path / "bad.jsonl"), [
      {"prompt": "a", "completion": "b"}, {"prompt": "a", "completion": 3}])
  cfg = load_config("sft", data__train=path)
  make = lambda r, w: examples.sft_example(tok, r, "prompt_completion", w, completion_only=True, add_eos=True)  # noqa
  with pytest.raises(DataError, match=r"bad.jsonl line 2: field 'completion' must be a string"):
    datasets.train_eval(cfg.data, make, length=len, truncated=lambda e: False, seed=0)
  with cfg.unlocked():
    cfg.data.bad_rows = "skip"
    cfg.data.eval_fraction = 0.0
  train, _, reps = datasets.train_eval(cfg.data, make, length=len, truncated=lambda e: False, seed=0)
  assert len(train) == 1 and sum(reps[0].dropped.values()) == 1


@pytest.mark.parametrize("row,msg", [
    ({"messages": [{"role": "user", "content": "hi"}]}, "no assistant turn"),
    ({"prompt": "a", "completion": "  "}, "field 'completion' is empty"),
    ({"foo": 1}, "cannot tell the record format"),
])
def test_bad_rows(row, msg):
  with pytest.raises(DataError, match=msg):
    fmt = formats.detect(list(row), "f.jsonl")
    formats.validate(row, fmt, "f.jsonl row 0")


def test_missing_file_and_template(tmp_path, tok):
  with pytest.raises(DataError, match="data.train=/nonexistent.jsonl: no such file"):
    sources.load_records("/nonexistent.jsonl")
  tok2 = fixtures.make_tokenizer(str(tmp_path / "t2"))
  tok2.chat_template = None
  with pytest.raises(DataError, match="no chat template"):
    examples.sft_example(tok2, {"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]},
                         "messages", "f row 0", completion_only=True, add_eos=True)


def test_too_long_policies(tok):
  ex = examples.Example(np.arange(20, dtype=np.int32), np.ones(20, bool))
  assert len(examples.fit_length(ex, 8, "truncate", "x")) == 8
  assert examples.fit_length(ex, 8, "drop", "x") is None
  with pytest.raises(DataError, match="x: 20 tokens exceed train.seq_len=8"):
    examples.fit_length(ex, 8, "error", "x")


def test_order_is_deterministic_and_resumable():
  exs = [examples.Example(np.arange(n, dtype=np.int32), np.ones(n, bool)) for n in range(3, 40)]
  it = batching.BatchIterator(exs, batch_size=2, seq_len=48, seed=1, pack=True)
  first = [next(it) for _ in range(25)]
  it2 = batching.BatchIterator(exs, batch_size=2, seq_len=48, seed=1, pack=True)
  [next(it2) for _ in range(11)]
  st_ = it2.state()
  it3 = batching.BatchIterator(exs, batch_size=2, seq_len=48, seed=1, pack=True)
  it3.restore(st_)
  for a in first[11:]:
    b = next(it3)
    np.testing.assert_array_equal(a["tokens"], b["tokens"])
  assert it.epoch >= 1  # Crossed an epoch boundary deterministically.


def test_dedup_and_eval_holdout(tmp_path, tok):
  rows = fixtures.prompt_completion_rows(40) * 2
  path = fixtures.write_jsonl(str(tmp_path / "d.jsonl"), rows)
  cfg = load_config("sft", data__train=path, data__eval_fraction=0.25)
  make = lambda r, w: examples.sft_example(tok, r, "prompt_completion", w, completion_only=True, add_eos=True)  # noqa
  train, evals, reps = datasets.train_eval(cfg.data, make, length=len, truncated=lambda e: False, seed=0)
  uniq = len({json.dumps(r, sort_keys=True) for r in rows})
  assert reps[0].dropped["duplicate"] == 80 - uniq
  assert len(train) + len(evals) == uniq and len(evals) == round(uniq * 0.25)
  assert os.path.exists(path)


def test_ranked_and_rated_expand_to_all_strict_pairs():
  row = {"prompt": "p", "responses": ["a", "b", "c"], "ranking": [1, 0, 2]}
  pairs = {(r["chosen"], r["rejected"]) for r in formats.expand_ranked(row)}
  assert pairs == {("b", "a"), ("b", "c"), ("a", "c")}  # K choose 2 with rank 0 best.
  rated = formats.expand_ranked({"prompt": "p", "responses": ["a", "b", "c"], "ratings": [3.0, 3.0, 1.0]})
  assert {(r["chosen"], r["rejected"]) for r in rated} == {("a", "c"), ("b", "c")}  # Ties give no pair.


def test_implicit_prompt_and_pair_truncation(tok):
  p, c, r = examples.split_implicit_prompt("the movie was good", "the movie was bad")
  assert (p, c, r) == ("the movie was", " good", " bad")
  msgs = [{"role": "user", "content": "hi"}]
  p, c, r = examples.split_implicit_prompt(msgs + [{"role": "assistant", "content": "a"}],
                                           msgs + [{"role": "assistant", "content": "b"}])
  assert p == msgs and c[0]["content"] == "a"
  long_prompt = " ".join(["the film was good"] * 20)
  pair = examples.pair_example(tok, {"prompt": long_prompt, "chosen": " great .", "rejected": " bad ."}, "f row 0",
                               seq_len=24, max_prompt_len=12, add_eos=True)
  assert pair.truncated and len(pair.chosen) <= 24
  full = examples.response_example(tok, long_prompt, " great .", "x", True)
  n_resp = int(full.trained.sum())
  # The end of the prompt and the start of the response are kept.
  np.testing.assert_array_equal(pair.chosen.ids[-n_resp:], full.ids[-n_resp:])
  np.testing.assert_array_equal(pair.chosen.ids[:-n_resp][-5:], full.ids[:-n_resp][-5:])
