"""The record shapes TRL uses, detected from the columns and validated row by row.

- text:               {"text": str}
- prompt_completion:  {"prompt": str | messages, "completion": str | messages}
- messages:           {"messages": [{"role": ..., "content": ...}, ...]}
- preference:         {"prompt"?: ..., "chosen": ..., "rejected": ..., "margin"?: float}
- ranked:             {"prompt": ..., "responses": [...], "ranking": [int] | "ratings": [float]}
- unpaired:           {"prompt": ..., "completion": ..., "label": bool}  (KTO)
- prompt:             {"prompt": str | messages}  (online RL)
"""

from __future__ import annotations

from typing import Any

from jaxalign.data.sources import DataError

FORMATS = ("text", "prompt_completion", "messages", "preference", "ranked", "unpaired", "prompt")


def detect(columns: list[str], where: str) -> str:
  cols = set(columns)
  if {"chosen", "rejected"} <= cols:
    return "preference"
  if "responses" in cols and ({"ranking", "ratings"} & cols):
    return "ranked"
  if {"prompt", "completion", "label"} <= cols:
    return "unpaired"
  if {"prompt", "completion"} <= cols:
    return "prompt_completion"
  if "messages" in cols:
    return "messages"
  if "text" in cols:
    return "text"
  if "prompt" in cols:
    return "prompt"
  raise DataError(f"{where}: cannot tell the record format from columns {sorted(cols)}; expected one of "
                  "text | prompt+completion | messages | prompt+chosen+rejected | prompt (see docs/sft.md)")


def is_conversation(x: Any) -> bool:
  return isinstance(x, list) and all(isinstance(m, dict) and "role" in m and "content" in m for m in x)


def _text_or_conv(row: dict, key: str, where: str, allow_empty: bool = False):
  if key not in row or row[key] is None:
    raise DataError(f"{where}: missing field {key!r}")
  v = row[key]
  if isinstance(v, str):
    if not allow_empty and not v.strip():
      raise DataError(f"{where}: field {key!r} is empty")
    return v
  if is_conversation(v):
    if not v and not allow_empty:
      raise DataError(f"{where}: field {key!r} is an empty conversation")
    for m in v:
      if not isinstance(m["content"], str):
        raise DataError(f"{where}: field {key!r} has a message whose content is {type(m['content']).__name__}, not str")
    return v
  raise DataError(f"{where}: field {key!r} must be a string or a list of {{role, content}} messages, "
                  f"got {type(v).__name__}")


def validate(row: dict, fmt: str, where: str) -> dict:
  """Return the row reduced to its format's fields; raise DataError naming `where` if malformed."""
  if fmt == "text":
    return {"text": _text_or_conv(row, "text", where)}
  if fmt == "prompt_completion":
    return {"prompt": _text_or_conv(row, "prompt", where, allow_empty=True),
            "completion": _text_or_conv(row, "completion", where)}
  if fmt == "messages":
    msgs = _text_or_conv(row, "messages", where)
    if not isinstance(msgs, list):
      raise DataError(f"{where}: field 'messages' must be a list of messages")
    if not any(m["role"] == "assistant" for m in msgs):
      raise DataError(f"{where}: conversation has no assistant turn (nothing to train on)")
    return {"messages": msgs}
  if fmt == "preference":
    out = {"prompt": _text_or_conv(row, "prompt", where, allow_empty=True) if "prompt" in row else "",
           "chosen": _text_or_conv(row, "chosen", where), "rejected": _text_or_conv(row, "rejected", where)}
    m = row.get("margin")
    if m is not None and not isinstance(m, (int, float)):
      raise DataError(f"{where}: field 'margin' must be a number, got {type(m).__name__}")
    out["margin"] = float(m or 0.0)
    return out
  if fmt == "unpaired":
    lab = row.get("label")
    if not isinstance(lab, (bool, int)):
      raise DataError(f"{where}: field 'label' must be a bool, got {type(lab).__name__}")
    return {"prompt": _text_or_conv(row, "prompt", where, allow_empty=True),
            "completion": _text_or_conv(row, "completion", where), "label": bool(lab)}
  if fmt == "ranked":
    resp = row.get("responses")
    if not isinstance(resp, list) or len(resp) < 2:
      raise DataError(f"{where}: field 'responses' must be a list of at least 2 responses")
    key = "ranking" if row.get("ranking") is not None else "ratings"
    vals = row.get(key)
    if not isinstance(vals, list) or len(vals) != len(resp):
      raise DataError(f"{where}: field {key!r} must be a list with one entry per response")
    return {"prompt": _text_or_conv(row, "prompt", where, allow_empty=True), "responses": resp, key: vals}
  if fmt == "prompt":  # Every other column rides along: reward functions read them (answers, tests, ...).
    return {"prompt": _text_or_conv(row, "prompt", where), **{k: v for k, v in row.items() if k != "prompt"}}
  raise DataError(f"data.format={fmt!r}: expected one of {FORMATS}")


def expand_ranked(row: dict) -> list[dict]:
  """K ranked (rank 0 = best) or rated responses -> all pairs with a strict preference (InstructGPT)."""
  resp = row["responses"]
  if "ranking" in row:
    better = lambda i, j: row["ranking"][i] < row["ranking"][j]  # noqa: E731
  else:
    better = lambda i, j: row["ratings"][i] > row["ratings"][j]  # noqa: E731
  out = []
  for i in range(len(resp)):
    for j in range(len(resp)):
      if better(i, j):
        out.append({"prompt": row["prompt"], "chosen": resp[i], "rejected": resp[j], "margin": 0.0})
  return out
