"""Built-in verifiable rewards: reward functions that check a completion against the row's reference answer.

Each follows the reward-function convention (`fn(prompts, completions, **columns) -> list[float | None]`,
jaxalign.rewards.functions) and reads the reference from the record's `answer` column (`None` where a row has
none, so it is left out of the mean). Name them on the command line:

  --config.reward.functions="('jaxalign.rewards.verifiers:math_answer', 'jaxalign.rewards.verifiers:answer_format')"

* `exact_answer`: 1.0 when the completion's final answer (see `final_answer`) equals the reference after
  whitespace and case normalisation, else 0.0.
* `numeric_answer`: 1.0 when both parse as numbers and agree to 1e-6 (relative), else 0.0.
* `math_answer`: equivalence of boxed / LaTeX / numeric answers with `math-verify` (Hugging Face's
  verifier, the field's standard: 1/2, 0.5 and \\frac{1}{2} agree), else 0.0.
* `answer_format`: 1.0 when the completion holds its answer in `<answer>...</answer>` or `\\boxed{...}`.
* `code_tests` (in `jaxalign.rewards.sandbox`, re-exported here): the fraction of the row's `tests` (assert
  snippets) the completion's code passes, each row in a sandboxed subprocess (timeout, memory, no network,
  no writes outside its temporary directory).

A verifier never raises on malformed output: a completion it cannot read scores 0.0.
"""

from __future__ import annotations

import re

from jaxalign.rewards.sandbox import code_tests  # noqa: F401  (nameable as jaxalign.rewards.verifiers:code_tests)

_BOXED = re.compile(r"\\boxed\{((?:[^{}]|\{[^{}]*\})*)\}")
_TAG = re.compile(r"<answer>(.*?)</answer>", re.S)
_NUMBER = re.compile(r"[-+]?\d[\d,]*(?:\.\d+)?(?:[eE][-+]?\d+)?|[-+]?\.\d+")


def final_answer(completion: str) -> str:
  """The answer a completion commits to: the last <answer>...</answer>, else the last \\boxed{...}, else the
  text after a final 'answer is' / '####' (GSM8K), else the whole text when it has no letters (a bare
  answer), else its last number, else the stripped text."""
  for pattern in (_TAG, _BOXED):
    found = pattern.findall(completion)
    if found:
      return found[-1].strip()
  m = re.search(r"(?:answer is|####)\s*:?\s*(.+)$", completion.strip(), re.I | re.S)
  if m:
    return m.group(1).strip().rstrip(".")
  if not re.search(r"[A-Za-z]", completion):  # A bare answer ("42", "2 8", "-1/2"): all of it.
    return completion.strip()
  nums = _NUMBER.findall(completion)
  return nums[-1] if nums else completion.strip()


def _norm(s) -> str:
  return re.sub(r"\s+", " ", str(s)).strip().strip(".").lower()


def _number(s) -> float | None:
  m = _NUMBER.findall(str(s))
  if not m:
    return None
  try:
    return float(m[-1].replace(",", ""))
  except ValueError:
    return None


def _per_row(completions, answer, check) -> list:
  """check(completion, reference) per row; None where the row has no reference."""
  answers = answer if answer is not None else [None] * len(completions)
  return [None if a is None else float(check(c, a)) for c, a in zip(completions, answers)]


def exact_answer(prompts, completions, answer=None, **_):
  return _per_row(completions, answer, lambda c, a: _norm(final_answer(c)) == _norm(a))


def _numbers_agree(c, a) -> bool:
  x, y = _number(final_answer(c)), _number(a)
  return x is not None and y is not None and abs(x - y) <= 1e-6 * max(1.0, abs(y))


def numeric_answer(prompts, completions, answer=None, **_):
  return _per_row(completions, answer, _numbers_agree)


def math_answer(prompts, completions, answer=None, **_):
  try:
    from math_verify import parse, verify
  except ImportError as e:  # An optional dependency: say how to get it.
    raise ImportError("jaxalign.rewards.verifiers:math_answer needs math-verify: pip install math-verify") from e

  def check(c, a):
    try:
      return bool(verify(parse(a if "$" in str(a) or "\\" in str(a) else f"${a}$"), parse(c)))
    except Exception:  # Malformed output costs this sample its reward, never the run.
      return False

  return _per_row(completions, answer, check)


def answer_format(prompts, completions, **_):
  return [float(bool(_TAG.search(c) or _BOXED.search(c))) for c in completions]
