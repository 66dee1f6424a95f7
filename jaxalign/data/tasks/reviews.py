"""A synthetic movie-review language with a known gold reward (the classic 'steer towards positive reviews'
RLHF demo, without the hub).

A review is 1-3 sentences from four templates over a small lexicon. The gold reward of any text is its
lexicon sentiment (adverbs scale, 'not' flips) averaged over sentences, clipped to [-5, 5]; `is_fluent`
checks the grammar, so a policy that hacks the reward with word salad shows up as non-fluent.
Everything is generated from a seed; nothing is downloaded.
"""

from __future__ import annotations

import json
import math
import os
import random
import re

NOUNS = ["movie", "film", "plot", "acting", "music", "story", "ending", "cast", "script", "soundtrack",
         "director", "dialogue", "pacing", "camera", "lead"]
ADJS = {"good": 1.0, "great": 2.0, "wonderful": 3.0, "brilliant": 3.0, "fun": 1.5, "charming": 1.5, "fine": 0.5,
        "bad": -1.0, "awful": -2.0, "terrible": -3.0, "boring": -1.5, "dull": -1.5, "weak": -1.0, "messy": -1.0,
        "long": -0.5, "strange": 0.0, "loud": -0.5, "quiet": 0.0}
VERBS = {"loved": 2.0, "enjoyed": 1.5, "liked": 1.0, "admired": 1.5, "hated": -2.0, "disliked": -1.0,
         "endured": -1.5, "regretted": -2.0, "watched": 0.0, "remember": 0.0}
ADVS = {"very": 1.5, "really": 1.5, "quite": 1.2, "somewhat": 0.7, "truly": 1.8}
_ADJ = "|".join(ADJS)
_N = "|".join(NOUNS)
_ADV = "|".join(ADVS)
_V = "|".join(VERBS)
TEMPLATES = [
    re.compile(rf"^the ({_N}) was (({_ADV}) )?(not )?({_ADJ})$"),
    re.compile(rf"^i (({_ADV}) )?({_V}) the ({_N})$"),
    re.compile(rf"^the ({_N}) and the ({_N}) were (({_ADV}) )?(not )?({_ADJ})$"),
    re.compile(rf"^overall it was (({_ADV}) )?(not )?({_ADJ})$"),
]


def sentences(text: str) -> list[str]:
  return [s.strip() for s in text.strip().split(" .") if s.strip()]


def is_fluent(text: str) -> bool:
  """True when every sentence follows a template and the text ends with ' .'."""
  t = text.strip()
  if not t.endswith(" .") and t != ".":
    return False
  ss = sentences(t)
  return bool(ss) and len(ss) <= 4 and all(any(p.match(s) for p in TEMPLATES) for s in ss)


def gold_reward(text: str) -> float:
  """Lexicon sentiment per sentence (any word order counts, so reward hacking is possible), clipped."""
  total, mult, neg = 0.0, 1.0, 1.0
  words = text.replace(".", " . ").split()
  n_sent = max(1, sum(w == "." for w in words))
  for w in words:
    if w in ADVS:
      mult *= ADVS[w]
    elif w == "not":
      neg = -neg
    elif w in ADJS or w in VERBS:
      total += (ADJS.get(w, 0.0) + VERBS.get(w, 0.0)) * mult * neg
      mult, neg = 1.0, 1.0
    elif w == ".":
      mult, neg = 1.0, 1.0
  return max(-5.0, min(5.0, total / n_sent))


class ReviewTask:
  """Deterministic generator of SFT reviews, prompts and noisy Bradley-Terry preference pairs."""

  def __init__(self, seed: int = 0, label_temperature: float = 1.0):
    self.seed = seed
    self.tau = label_temperature

  def _adj(self, rng):
    adv = (rng.choice(list(ADVS)) + " ") if rng.random() < 0.3 else ""
    neg = "not " if rng.random() < 0.1 else ""
    return adv + neg + rng.choice(list(ADJS))

  def sentence(self, rng: random.Random) -> str:
    k = rng.randrange(4)
    if k == 0:
      return f"the {rng.choice(NOUNS)} was {self._adj(rng)}"
    if k == 1:
      adv = (rng.choice(["really", "truly"]) + " ") if rng.random() < 0.3 else ""
      return f"i {adv}{rng.choice(list(VERBS))} the {rng.choice(NOUNS)}"
    if k == 2:
      a, b = rng.sample(NOUNS, 2)
      return f"the {a} and the {b} were {self._adj(rng)}"
    return f"overall it was {self._adj(rng)}"

  def prompt(self, rng: random.Random) -> str:
    return f"the {rng.choice(NOUNS)} was" if rng.random() < 0.8 else "overall it was"

  def completion(self, rng: random.Random) -> str:
    """Continues a prompt ('... was'): an adjective phrase, then 0-2 more sentences."""
    parts = [" " + self._adj(rng) + " ."]
    for _ in range(rng.randrange(3)):
      parts.append(" " + self.sentence(rng) + " .")
    return "".join(parts)

  def sft_rows(self, n: int, split: str = "train") -> list[dict]:
    rng = random.Random(f"{self.seed}-sft-{split}")
    return [{"prompt": self.prompt(rng), "completion": self.completion(rng)} for _ in range(n)]

  def prompt_rows(self, n: int, split: str = "train") -> list[dict]:
    rng = random.Random(f"{self.seed}-prompt-{split}")
    return [{"prompt": self.prompt(rng)} for _ in range(n)]

  def preference_rows(self, n: int, split: str = "train") -> tuple[list[dict], float]:
    """Pairs labelled by noisy annotators: P(a preferred) = sigmoid((gold_a - gold_b) / tau).
    Returns the rows and the gold agreement rate of the labels (the ceiling for a reward model)."""
    rng = random.Random(f"{self.seed}-pref-{split}")
    rows, agree, counted = [], 0, 0
    while len(rows) < n:
      p = self.prompt(rng)
      a, b = self.completion(rng), self.completion(rng)
      ga, gb = gold_reward(p + a), gold_reward(p + b)
      if a == b or ga == gb:
        continue
      prefer_a = rng.random() < 1 / (1 + math.exp(-(ga - gb) / self.tau))
      chosen, rejected = (a, b) if prefer_a else (b, a)
      rows.append({"prompt": p, "chosen": chosen, "rejected": rejected})
      agree += int((ga > gb) == prefer_a)
      counted += 1
    return rows, agree / max(counted, 1)

  def corpus(self, n: int = 4000) -> list[str]:
    rng = random.Random(f"{self.seed}-corpus")
    return [self.prompt(rng) + self.completion(rng) for _ in range(n)]


def write_task(directory: str, seed: int = 0, n_sft: int = 4000, n_pref: int = 2000, n_prompts: int = 1000,
               n_eval: int = 200, vocab_size: int = 512) -> dict[str, str]:
  """Write the task's JSONL files and a trained HF tokenizer; returns their paths."""
  from jaxalign.data.tasks.tokenizer import train_tokenizer

  os.makedirs(directory, exist_ok=True)
  task = ReviewTask(seed)
  paths = {}

  def dump(name, rows):
    path = os.path.join(directory, name)
    with open(path, "w") as f:
      for r in rows:
        f.write(json.dumps(r) + "\n")
    paths[name.split(".")[0]] = path

  dump("sft_train.jsonl", task.sft_rows(n_sft, "train"))
  dump("sft_eval.jsonl", task.sft_rows(n_eval, "eval"))
  train_pairs, agree = task.preference_rows(n_pref, "train")
  eval_pairs, eval_agree = task.preference_rows(n_eval, "eval")
  dump("pref_train.jsonl", train_pairs)
  dump("pref_eval.jsonl", eval_pairs)
  dump("prompts_train.jsonl", task.prompt_rows(n_prompts, "train"))
  dump("prompts_eval.jsonl", task.prompt_rows(n_eval, "eval"))
  tok = train_tokenizer(task.corpus() + [" ".join(NOUNS + list(ADJS) + list(VERBS) + list(ADVS))], vocab_size)
  tok.save_pretrained(os.path.join(directory, "tokenizer"))
  paths["tokenizer"] = os.path.join(directory, "tokenizer")
  with open(os.path.join(directory, "task.json"), "w") as f:
    json.dump({"task": "reviews", "seed": seed, "label_agreement_train": agree, "label_agreement_eval": eval_agree},
              f, indent=2)
  paths["info"] = os.path.join(directory, "task.json")
  return paths


def gold_reward_fn(prompts: list[str], completions: list[str], **_) -> list[float]:
  """Reward function (TRL signature) for GRPO/evaluation: the gold sentiment of prompt + completion."""
  return [gold_reward(p + c) for p, c in zip(prompts, completions)]


def fluency_fn(prompts: list[str], completions: list[str], **_) -> list[float]:
  """1.0 where prompt + completion is grammatical, else 0.0."""
  return [float(is_fluent(p + c)) for p, c in zip(prompts, completions)]
