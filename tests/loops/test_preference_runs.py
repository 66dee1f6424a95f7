"""Reward model and DPO from an SFT checkpoint: stage linking, gold agreement, HF parity, reference modes."""

import json
import os

import jax.numpy as jnp
import numpy as np
import torch

from jaxalign.data import batching
from jaxalign.data import datasets
from jaxalign.loops import stages
from jaxalign.models import heads, hf
from tests.conftest import load_config


def _rows(wd, split):
  with open(os.path.join(wd, "metrics.jsonl")) as f:
    return [r for r in map(json.loads, f) if r["split"] == split]


def test_reward_model_via_cli_matches_gold_and_exports(task_sft, task_rm):
  wd = task_rm  # Trained by `launch/train.py --config=configs/reward.py:tiny` (see conftest.task_rm).
  run = json.load(open(os.path.join(wd, "run.json")))
  source = dict(run["sources"]["model"])
  chosen = source.pop("checkpoint")  # SFT keeps its best checkpoint by eval loss: the last one here.
  assert source == {"path": os.path.abspath(task_sft["sft"]), "step": 150, "kind": "jaxalign", "stage": "sft"}
  assert chosen == "latest" or chosen.startswith("best eval/loss="), chosen
  acc = _rows(wd, "eval")[-1]["accuracy"]
  agree = json.load(open(task_sft["info"]))["label_agreement_eval"]
  print(f"reward model held-out accuracy {acc:.3f} vs gold label agreement {agree:.3f}")
  assert acc >= agree - 0.1 and acc > 0.6

  # The exported sequence-classification model scores like jaxalign.
  import transformers
  exp = os.path.join(wd, "export", "hf")
  model = transformers.AutoModelForSequenceClassification.from_pretrained(exp, dtype=torch.float32).eval()
  assert type(model).__name__ == "LlamaForSequenceClassification"
  cfg = hf.config_from_hf(exp)
  params = hf.load_params(exp, cfg)
  head = hf.load_score_head(exp, cfg)
  tok = transformers.AutoTokenizer.from_pretrained(exp)
  rcfg = load_config("reward", "tiny", model__init=task_sft["sft"], data__train=task_sft["pref_train"],
                     data__eval=task_sft["pref_eval"])
  _, evals, _ = datasets.pair_examples(rcfg, tok)
  b = batching.eval_pair_batches(evals[:8], batch_size=8, seq_len=64)[0]
  toks, seg = b["tokens"].reshape(16, -1), b["segment_ids"].reshape(16, -1)
  toks = np.where(seg > 0, toks, tok.pad_token_id)
  ours = np.asarray(heads.sequence_scores(cfg, params, head, jnp.asarray(toks), None, jnp.asarray(seg)))
  with torch.no_grad():
    theirs = model(input_ids=torch.tensor(toks).long(), attention_mask=torch.tensor(seg > 0).long()).logits[:, 0]
  np.testing.assert_allclose(ours, theirs.numpy(), atol=1e-4)


def _dpo_cfg(task_sft, **kw):
  base = dict(model__init=task_sft["sft"], data__train=task_sft["pref_train"], data__eval=task_sft["pref_eval"],
              train__batch_size=16, logging__progress=False, logging__tensorboard=False, export__hf=False,
              logging__every=1)
  base.update(kw)
  return load_config("dpo", "tiny", **base)


def test_dpo_raises_heldout_accuracy_and_margin(task_sft, tmp_path):
  wd = str(tmp_path / "dpo")
  stages.train(_dpo_cfg(task_sft, train__steps=60, eval__every=20, optimizer__learning_rate=5e-4), wd)
  ev = _rows(wd, "eval")
  print("DPO held-out:", [(r["step"], round(r["rewards/accuracies"], 3), round(r["rewards/margins"], 3)) for r in ev])
  assert ev[-1]["rewards/accuracies"] > 0.6  # At step 0 policy == reference: accuracy 0, margin 0.
  assert ev[-1]["rewards/margins"] > ev[0]["rewards/margins"] > 0
  run = json.load(open(os.path.join(wd, "run.json")))
  assert run["sources"]["reference"]["path"] == os.path.abspath(task_sft["sft"])


def test_precomputed_reference_equals_live(task_sft, tmp_path):
  losses = []
  for pre in (False, True):
    wd = str(tmp_path / f"pre{pre}")
    stages.train(_dpo_cfg(task_sft, train__steps=4, eval__every=0, reference__precompute=pre,
                                  optimizer__learning_rate=5e-4, checkpoint__every=100), wd)
    losses.append([r["loss"] for r in _rows(wd, "train")] + [_rows(wd, "eval")[-1]["loss"]])
  np.testing.assert_allclose(losses[0], losses[1], rtol=0, atol=1e-5)
  assert losses[0][0] != losses[0][-1]


def test_reference_free_and_kto_run(task_sft, tmp_path):
  for lt in ("simpo", "orpo", "ipo"):
    wd = str(tmp_path / lt)
    stages.train(_dpo_cfg(task_sft, train__steps=3, eval__every=0, loss__type=lt), wd)
    assert all(np.isfinite(r["loss"]) for r in _rows(wd, "train"))
    assert ("reference" in json.load(open(os.path.join(wd, "run.json")))["sources"]) == (lt == "ipo")
  rows = [json.loads(x) for x in open(task_sft["pref_train"])][:200]
  kto_rows = [{"prompt": r["prompt"], "completion": r["chosen"], "label": True} for r in rows[:100]]
  kto_rows += [{"prompt": r["prompt"], "completion": r["rejected"], "label": False} for r in rows[100:]]
  path = tmp_path / "kto.jsonl"
  path.write_text("".join(json.dumps(r) + "\n" for r in kto_rows))
  wd = str(tmp_path / "kto")
  stages.train(_dpo_cfg(task_sft, train__steps=3, eval__every=0, loss__type="kto", data__train=str(path),
                                data__eval="", data__eval_fraction=0.1), wd)
  assert all(np.isfinite(r["loss"]) for r in _rows(wd, "train"))
