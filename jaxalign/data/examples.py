"""Records -> token ids with a per-token 'trained' mask.

Boundary policy (documented in docs/sft.md): a record is rendered to text segments, each marked trained or
not (prompt vs completion, user vs assistant turn); each segment is tokenised on its own and the ids are
concatenated. The prompt/completion token boundary is therefore exactly the text boundary, and the prompt
ids are the very ids the sampler is given at generation time. (Tokenising the joined text can merge tokens
across the boundary; we never do.)
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np

from jaxalign.data.formats import is_conversation
from jaxalign.data.sources import DataError

CHAT_TEMPLATES = {
    "chatml": ("{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\n' + m['content'] + '<|im_end|>\n' }}"
               "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"),
}


@dataclasses.dataclass
class Example:
  """One tokenised sequence: ids and which tokens carry loss."""

  ids: np.ndarray  # int32 [n]
  trained: np.ndarray  # bool [n]; trained[i]: loss on predicting token i.
  truncated: bool = False

  def __len__(self):
    return len(self.ids)


def set_chat_template(tokenizer, template: str):
  """'' keeps the tokenizer's own; a name from CHAT_TEMPLATES or a Jinja string replaces it."""
  if template:
    tokenizer.chat_template = CHAT_TEMPLATES.get(template, template)


def _adds_bos(tokenizer) -> bool:
  bos = tokenizer.bos_token_id
  if bos is None:
    return False
  ids = tokenizer("a", add_special_tokens=True)["input_ids"]
  return bool(ids) and ids[0] == bos


def _render(tokenizer, messages, add_generation_prompt: bool, where: str) -> str:
  if not getattr(tokenizer, "chat_template", None):
    raise DataError(f"{where}: conversational record but the tokenizer has no chat template; set "
                    "data.chat_template (e.g. 'chatml') or use a tokenizer that has one")
  return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)


def chat_segments(tokenizer, messages: list[dict], where: str, train_all_assistant: bool = True):
  """Text segments of a conversation, assistant turns marked trained."""
  segs: list[tuple[str, bool]] = []
  done = ""
  for i, m in enumerate(messages):
    if m["role"] != "assistant":
      continue
    prefix = _render(tokenizer, messages[:i], True, where) if i else _render(tokenizer, [], True, where)
    upto = _render(tokenizer, messages[: i + 1], False, where)
    if not prefix.startswith(done) or not upto.startswith(prefix):
      raise DataError(f"{where}: the chat template does not render conversations prefix-consistently, so "
                      "assistant tokens cannot be located; set data.chat_template")
    segs.append((prefix[len(done):], False))
    segs.append((upto[len(prefix):], train_all_assistant or i == len(messages) - 1))
    done = upto
  full = _render(tokenizer, messages, False, where)
  if full.startswith(done) and len(full) > len(done):
    segs.append((full[len(done):], False))
  return [(t, tr) for t, tr in segs if t]


def encode_segments(tokenizer, segments: list[tuple[str, bool]], *, bos: bool, eos: bool) -> Example:
  ids: list[int] = [tokenizer.bos_token_id] if bos else []
  trained: list[bool] = [False] * len(ids)
  for text, tr in segments:
    piece = tokenizer(text, add_special_tokens=False)["input_ids"]
    ids += piece
    trained += [tr] * len(piece)
  if eos:
    ids.append(tokenizer.eos_token_id)
    trained.append(True)
  return Example(np.asarray(ids, np.int32), np.asarray(trained, bool))


def prompt_segments(tokenizer, prompt: Any, where: str) -> tuple[list[tuple[str, bool]], bool]:
  """Segments of a prompt alone (as given to the sampler), and whether it was conversational."""
  if is_conversation(prompt):
    return [(_render(tokenizer, prompt, True, where), False)], True
  return ([(prompt, False)] if prompt else []), False


def completion_segments(tokenizer, prompt: Any, completion: Any, where: str) -> tuple[list[tuple[str, bool]], bool]:
  """Segments of prompt + completion; conversational when either is a message list."""
  if is_conversation(prompt) or is_conversation(completion):
    p = prompt if is_conversation(prompt) else ([{"role": "user", "content": prompt}] if prompt else [])
    c = completion if is_conversation(completion) else [{"role": "assistant", "content": completion}]
    segs = chat_segments(tokenizer, p + c, where)
    return [(t, tr and True) for t, tr in segs], True
  return [(prompt, False), (completion, True)] if prompt else [(completion, True)], False


def sft_example(tokenizer, row: dict, fmt: str, where: str, *, completion_only: bool, add_eos: bool) -> Example:
  """One SFT record -> Example (raises DataError naming `where`)."""
  bos = _adds_bos(tokenizer)
  if fmt == "text":
    if is_conversation(row["text"]):
      ex = encode_segments(tokenizer, chat_segments(tokenizer, row["text"], where), bos=False, eos=False)
    else:
      ex = encode_segments(tokenizer, [(row["text"], True)], bos=bos, eos=add_eos)
  elif fmt == "messages":
    ex = encode_segments(tokenizer, chat_segments(tokenizer, row["messages"], where), bos=False, eos=False)
  elif fmt == "prompt_completion":
    segs, conv = completion_segments(tokenizer, row["prompt"], row["completion"], where)
    ex = encode_segments(tokenizer, segs, bos=bos and not conv, eos=add_eos and not conv)
  else:
    raise DataError(f"{where}: format {fmt!r} is not an SFT format (text, prompt_completion, messages)")
  if not completion_only:
    ex.trained[:] = True
    if bos:
      ex.trained[0] = False
  if len(ex.ids) == 0 or not ex.trained.any():
    raise DataError(f"{where}: record tokenizes to no trainable tokens")
  return ex


def prompt_ids(tokenizer, prompt: Any, where: str) -> np.ndarray:
  segs, conv = prompt_segments(tokenizer, prompt, where)
  ex = encode_segments(tokenizer, segs, bos=_adds_bos(tokenizer) and not conv, eos=False)
  if len(ex.ids) == 0:
    raise DataError(f"{where}: prompt tokenizes to nothing")
  return ex.ids


def fit_length(ex: Example, seq_len: int, policy: str, where: str) -> Example | None:
  """Apply the too-long policy: 'truncate' keeps the start, 'drop' returns None, 'error' raises."""
  if len(ex.ids) <= seq_len:
    return ex
  if policy == "error":
    raise DataError(f"{where}: {len(ex.ids)} tokens exceed train.seq_len={seq_len} (data.too_long=error; "
                    "use truncate or drop, or raise train.seq_len)")
  if policy == "drop":
    return None
  if policy != "truncate":
    raise ValueError(f"data.too_long={policy!r}: expected truncate | drop | error")
  out = Example(ex.ids[:seq_len].copy(), ex.trained[:seq_len].copy(), truncated=True)
  return out if out.trained.any() else None


@dataclasses.dataclass
class PairExample:
  """A preference pair sharing a prompt; `ref` holds precomputed reference log-probs (chosen, rejected)."""

  chosen: Example
  rejected: Example
  margin: float = 0.0
  truncated: bool = False
  ref: np.ndarray | None = None
  label: float | None = None  # KTO: 1 desirable / 0 undesirable (then `rejected` is the KL-baseline row).

  def __len__(self):
    return max(len(self.chosen), len(self.rejected))


def split_implicit_prompt(chosen: Any, rejected: Any) -> tuple[Any, Any, Any]:
  """(prompt, chosen, rejected) from records whose prompt is the shared prefix (TRL's implicit prompt)."""
  if is_conversation(chosen) and is_conversation(rejected):
    n = 0
    while n < min(len(chosen), len(rejected)) - 1 and chosen[n] == rejected[n]:
      n += 1
    return chosen[:n], chosen[n:], rejected[n:]
  if isinstance(chosen, str) and isinstance(rejected, str):
    n = 0
    while n < min(len(chosen), len(rejected)) and chosen[n] == rejected[n]:
      n += 1
    cut = chosen.rfind(" ", 0, n + 1) if n < len(chosen) else n
    cut = max(cut, 0)
    return chosen[:cut], chosen[cut:], rejected[cut:]
  return "", chosen, rejected


def _split_at_first_trained(ex: Example) -> int:
  idx = np.nonzero(ex.trained)[0]
  return int(idx[0]) if len(idx) else len(ex.ids)


def truncate_pair(ex: Example, seq_len: int, max_prompt_len: int) -> Example:
  """Keep the end of the prompt (at most max_prompt_len) and the start of the response."""
  if len(ex.ids) <= seq_len:
    return ex
  cut = _split_at_first_trained(ex)
  keep_p = min(cut, max_prompt_len)
  ids = np.concatenate([ex.ids[cut - keep_p:cut], ex.ids[cut:]])[:seq_len]
  tr = np.concatenate([ex.trained[cut - keep_p:cut], ex.trained[cut:]])[:seq_len]
  return Example(ids, tr, truncated=True)


def response_example(tokenizer, prompt: Any, response: Any, where: str, add_eos: bool) -> Example:
  bos = _adds_bos(tokenizer)
  segs, conv = completion_segments(tokenizer, prompt, response, where)
  return encode_segments(tokenizer, segs, bos=bos and not conv, eos=add_eos and not conv)


def pair_example(tokenizer, row: dict, where: str, *, seq_len: int, max_prompt_len: int, add_eos: bool,
                 too_long: str = "truncate") -> PairExample | None:
  """prompt/chosen/rejected (explicit or implicit prompt) -> PairExample under the pair truncation policy."""
  missing = [k for k in ("chosen", "rejected") if k not in row]
  if missing:
    raise DataError(f"{where}: a preference stage needs 'chosen' and 'rejected' fields; this record has "
                    f"{sorted(row)} (prompt-only data is for PPO/GRPO; SFT data for the sft stage)")
  prompt, chosen, rejected = row.get("prompt", ""), row["chosen"], row["rejected"]
  if not prompt:
    prompt, chosen, rejected = split_implicit_prompt(chosen, rejected)
  c = response_example(tokenizer, prompt, chosen, where, add_eos)
  r = response_example(tokenizer, prompt, rejected, where, add_eos)
  for name, ex in (("chosen", c), ("rejected", r)):
    if not ex.trained.any():
      raise DataError(f"{where}: {name} response tokenizes to nothing")
  long = max(len(c), len(r)) > seq_len
  if long and too_long == "error":
    raise DataError(f"{where}: {max(len(c), len(r))} tokens exceed train.seq_len={seq_len} (data.too_long=error)")
  if long and too_long == "drop":
    return None
  c, r = truncate_pair(c, seq_len, max_prompt_len), truncate_pair(r, seq_len, max_prompt_len)
  if not c.trained.any() or not r.trained.any():
    return None
  return PairExample(c, r, float(row.get("margin", 0.0) or 0.0), truncated=long)


def kto_examples(tokenizer, rows: list[tuple[dict, str]], *, seq_len: int, max_prompt_len: int, add_eos: bool):
  """Unpaired (prompt, completion, label) -> PairExample(completion, mismatched KL row, label).

  The KL baseline row of example i is prompt_i + completion_{i+1} (a fixed shift, as TRL's in-batch shift).
  """
  singles = []
  for row, where in rows:
    ex = response_example(tokenizer, row["prompt"], row["completion"], where, add_eos)
    if not ex.trained.any():
      raise DataError(f"{where}: completion tokenizes to nothing")
    singles.append(truncate_pair(ex, seq_len, max_prompt_len))
  out = []
  for i, ex in enumerate(singles):
    nxt = singles[(i + 1) % len(singles)]
    cut_i, cut_j = _split_at_first_trained(ex), _split_at_first_trained(nxt)
    kl = Example(np.concatenate([ex.ids[:cut_i], nxt.ids[cut_j:]]),
                 np.concatenate([ex.trained[:cut_i], nxt.trained[cut_j:]]))
    kl = truncate_pair(kl, seq_len, max_prompt_len)
    out.append(PairExample(ex, kl, 0.0, truncated=ex.truncated, label=float(rows[i][0]["label"])))
  return out
