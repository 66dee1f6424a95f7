"""Every stage run's own small report: WORKDIR/report.md and WORKDIR/curves.png from its metrics.jsonl.

Written by the driver when a run finishes (and by `evaluate`), on the primary process, local or in a bucket.
The curves are the stage's headline metrics (loss, reward, KL, accuracy ...): train as lines, evals as points;
the table is the last train row, the last eval row and the summary row.
"""

from __future__ import annotations

import io
import json
import logging
import math

from jaxalign import paths

# Headline metrics per stage, in plotting order; only those present are drawn (at most four panels).
HEADLINES = {
    "sft": ("loss", "ppl", "grad_norm", "tokens_per_s"),
    "reward": ("loss", "accuracy", "margin", "grad_norm"),
    "dpo": ("loss", "rewards/accuracies", "rewards/margins", "chosen_logratio"),
    "ppo": ("score", "kl", "entropy", "response_length"),
    "grpo": ("reward", "kl", "entropy", "response_length"),
}


def rows(workdir: str, stage: str | None = None) -> list[dict]:
  path = paths.join(workdir, "metrics.jsonl")
  if not paths.exists(path):
    return []
  out = []
  for line in paths.read_text(path).splitlines():
    try:
      r = json.loads(line)
    except ValueError:
      continue
    if stage is None or r.get("stage") == stage:
      out.append(r)
  return out


def _numeric(row: dict) -> dict:
  return {k: v for k, v in row.items() if isinstance(v, (int, float)) and not isinstance(v, bool)
          and k != "step" and math.isfinite(v)}


def write(workdir: str, stage: str) -> str | None:
  """Write report.md (+ curves.png when there is a curve); returns the report's path, or None without rows."""
  rs = rows(workdir, stage)
  if not rs:
    return None
  train = [r for r in rs if r.get("split") == "train"]
  evals = [r for r in rs if r.get("split") == "eval"]
  summary = [r for r in rs if r.get("split") == "summary"]
  keys = [k for k in HEADLINES.get(stage, ()) if any(k in r for r in train + evals)]
  if not keys and train:
    keys = sorted(_numeric(train[-1]))[:4]
  lines = [f"# {stage} run: {workdir}", ""]
  if keys and (train or evals):
    try:
      _plot(paths.join(workdir, "curves.png"), stage, keys[:4], train, evals)
      lines += ["![curves](curves.png)", ""]
    except Exception as e:  # A report is a convenience: never fail a finished run for a plot.
      logging.warning("report: curves.png not written: %s", e)
  for title, group in (("last train row", train), ("last eval row", evals), ("summary", summary)):
    if group:
      last = group[-1]
      lines += [f"## {title} (step {last['step']})", "", "| metric | value |", "|---|---|"]
      lines += [f"| {k} | {_fmt(v)} |" for k, v in sorted(_numeric(last).items())]
      lines.append("")
  out = paths.join(workdir, "report.md")
  paths.write_text(out, "\n".join(lines))
  return out


def _fmt(v) -> str:
  return f"{v:.4g}" if isinstance(v, float) else str(v)


def _plot(path: str, stage: str, keys: list[str], train: list[dict], evals: list[dict]):
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  fig, axes = plt.subplots(1, len(keys), figsize=(4 * len(keys), 3.2), squeeze=False)
  for ax, k in zip(axes[0], keys):
    tr = [(r["step"], r[k]) for r in train if isinstance(r.get(k), (int, float))]
    ev = [(r["step"], r[k]) for r in evals if isinstance(r.get(k), (int, float))]
    if tr:
      ax.plot(*zip(*tr), color="tab:blue", label="train")
    if ev:
      ax.plot(*zip(*ev), "o-", color="black", label="eval")
    ax.set_title(k)
    ax.set_xlabel("step")
    ax.set_ylabel(k)
    if tr and ev:
      ax.legend(fontsize=8)
  fig.suptitle(stage)
  fig.tight_layout()
  buf = io.BytesIO()
  fig.savefig(buf, format="png", dpi=80)
  plt.close(fig)
  with paths.open(path, "wb") as f:
    f.write(buf.getvalue())
