"""A built-in task with verifiable answers, generated from a seed with no download: addition problems.

A prompt is `"12 + 7 ="`, its answer `"19"`; the digits are spaced in the text the model reads (`"1 2 + 7 ="`,
answer `" 1 9"`), so the tokenizer gives one token per digit and a small model can learn the carries. Prompt
files carry the reference in an `answer` column, which `jaxalign.rewards.verifiers:exact_answer` reads (the
GSM8K / MATH layout: a prompt and a reference answer). SFT files hold prompt/completion pairs.
"""

from __future__ import annotations

import json
import os
import random


def spaced(n: int) -> str:
  return " ".join(str(n))


def problem(rng: random.Random, digits: int = 2, reverse: bool = False) -> tuple[str, str]:
  """`reverse`: the answer is written least significant digit first ('1 2 + 3 9 =' -> '1 5' for 51), the
  order in which a model can add without looking ahead for carries (Lee et al., 2023)."""
  a, b = rng.randrange(10 ** digits), rng.randrange(10 ** digits)
  answer = spaced(a + b)
  return f"{spaced(a)} + {spaced(b)} =", answer[::-1] if reverse else answer


def rows(n: int, seed: int, digits: int = 2, split: str = "train", reverse: bool = False) -> list[dict]:
  """`n` distinct problems of one split (write_task keeps eval problems out of the train files)."""
  rng = random.Random(f"{seed}-{split}")
  seen, out = set(), []
  while len(out) < n:
    p, a = problem(rng, digits, reverse)
    if p in seen:
      continue
    seen.add(p)
    out.append({"prompt": p, "answer": a})
  return out


def wrong(rng: random.Random, answer: str) -> str:
  """The answer with one digit changed (a plausible slip, as a weaker demonstrator makes)."""
  digits = answer.split(" ")
  i = rng.randrange(len(digits))
  digits[i] = str((int(digits[i]) + rng.randrange(1, 10)) % 10)
  return " ".join(digits)


def write_task(directory: str, seed: int = 0, n_sft: int = 3000, n_prompts: int = 1000, n_eval: int = 200,
               digits: int = 2, noise: float = 0.0, reverse: bool = False) -> dict[str, str]:
  """SFT pairs, train/eval prompts with answers, and a tokenizer; returns their paths. Eval problems never
  appear in the train files. `noise`: the fraction of SFT demonstrations whose answer has one wrong digit
  (imperfect demonstrations: what the verifier-driven RL stage can fix and SFT cannot)."""
  from jaxalign.data.tasks.tokenizer import train_tokenizer

  os.makedirs(directory, exist_ok=True)
  evals = rows(n_eval, seed, digits, "eval", reverse)
  banned = {r["prompt"] for r in evals}
  train = [r for r in rows(n_sft + n_prompts + n_eval, seed, digits, "train", reverse) if r["prompt"] not in banned]
  sft, prompts = train[:n_sft], train[n_sft:n_sft + n_prompts]
  out = {}

  def dump(name, items):
    path = os.path.join(directory, name)
    with open(path, "w") as f:
      for r in items:
        f.write(json.dumps(r) + "\n")
    out[name.split(".")[0]] = path

  slip = random.Random(f"{seed}-noise")
  dump("sft_train.jsonl", [{"prompt": r["prompt"], "completion": " " + (
      wrong(slip, r["answer"]) if slip.random() < noise else r["answer"])} for r in sft])
  dump("sft_eval.jsonl", [{"prompt": r["prompt"], "completion": " " + r["answer"]} for r in evals[:64]])
  dump("prompts_train.jsonl", prompts)
  dump("prompts_eval.jsonl", evals)
  tok = train_tokenizer([" ".join("0123456789+=") + " " + r["prompt"] + " " + r["answer"] for r in train[:500]],
                        vocab_size=300)
  tok.save_pretrained(os.path.join(directory, "tokenizer"))
  out["tokenizer"] = os.path.join(directory, "tokenizer")
  with open(os.path.join(directory, "task.json"), "w") as f:
    json.dump({"task": "arithmetic", "seed": seed, "digits": digits, "noise": noise,
               "reverse": reverse}, f, indent=2)
  return out
