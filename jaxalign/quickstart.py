"""The quickstart pipeline: every stage an ordinary `launch/train.py` run, then a report with plots.

Stages write `<workdir>/<stage>/DONE` when finished, so rerunning the same command skips what is done and
resumes what was interrupted (each run resumes from its own checkpoints).
"""

from __future__ import annotations

import json
import logging
import math
import os
import subprocess
import sys
import time

import numpy as np

from jaxalign import configs

GOLD, FLUENT = "reward/gold_reward_fn", "reward/fluency_fn"
COLORS = {"sft": "tab:gray", "dpo": "tab:blue", "ppo": "tab:orange", "grpo": "tab:green"}  # One per method.


def _flags(group, prefix="--config.") -> list[str]:
  out = []
  for key, value in group.items():
    if hasattr(value, "items"):
      out += _flags(value, f"{prefix}{key}.")
    else:
      out.append(f"{prefix}{key}={value!r}" if isinstance(value, (tuple, list)) else f"{prefix}{key}={value}")
  return out


def run_stage(name: str, config_file: str, workdir: str, overrides, extra: dict, counter: str = "") -> float:
  """Run one stage in a subprocess (as a user would); skip it if already done. Returns seconds taken.
  `counter`: "k/n", the stage's place in the pipeline."""
  done = os.path.join(workdir, "DONE")
  name = f"stage {counter} {name}" if counter else name
  if os.path.exists(done):
    print(f"[pipeline] {name}: done already ({workdir})", flush=True)
    return 0.0
  cmd = [sys.executable, "-m", "jaxalign.cli", "train", f"--config={config_file}",
         f"--workdir={workdir}"] + _flags(overrides) + [f"--config.{k}={v}" for k, v in extra.items()]
  print(f"[pipeline] {name}: {' '.join(cmd[1:])}", flush=True)
  t = time.time()
  proc = subprocess.run(cmd)
  if proc.returncode != 0:
    raise SystemExit(f"[pipeline] stage {name} failed (exit {proc.returncode}); fix and rerun the same command "
                     "to resume")
  with open(done, "w") as f:
    f.write(time.strftime("%Y-%m-%d %H:%M:%S\n"))
  return time.time() - t


def rows(workdir: str, split: str | None = None) -> list[dict]:
  path = os.path.join(workdir, "metrics.jsonl")
  if not os.path.exists(path):
    return []
  with open(path) as f:
    out = [json.loads(line) for line in f]
  return [r for r in out if split is None or r["split"] == split]


def run(config, workdir: str) -> dict:
  """Run the whole pipeline; returns the summary table (also written to report.md)."""
  from jaxalign.data.tasks import reviews

  if config.task.name == "arithmetic":  # The verifiable-reward pipeline.
    from jaxalign import quickstart_arithmetic
    return quickstart_arithmetic.run(config, workdir)
  workdir = os.path.abspath(workdir)  # Each stage runs in its own process, from any directory.

  os.makedirs(workdir, exist_ok=True)
  data = os.path.join(workdir, "data")
  t0 = time.time()
  if not os.path.exists(os.path.join(data, "task.json")):
    reviews.write_task(data, seed=config.seed, **{k: v for k, v in config.task.items() if k != "name"})
  p = {k: os.path.join(data, f"{k}.jsonl") for k in ("sft_train", "sft_eval", "pref_train", "pref_eval",
                                                      "prompts_train", "prompts_eval")}
  d = lambda s: os.path.join(workdir, s)  # noqa: E731
  cfg = configs.path  # The installed stage configs (jaxalign/configs/).
  times = {}
  n_stages = 2 + 2 * len(config.methods) + 1  # SFT, RM, each method, each policy's evaluation (and SFT's).
  k = iter(range(1, n_stages + 1))
  count = lambda: f"{next(k)}/{n_stages}"  # noqa: E731
  times["sft"] = run_stage("sft", cfg("sft"), d("sft"), config.sft, {
      "model.tokenizer": os.path.join(data, "tokenizer"), "data.train": p["sft_train"], "data.eval": p["sft_eval"]},
      count())
  times["reward"] = run_stage("reward", cfg("reward"), d("reward"), config.reward, {
      "model.init": d("sft"), "data.train": p["pref_train"], "data.eval": p["pref_eval"]}, count())
  for m in config.methods:
    if m == "dpo":
      extra = {"model.init": d("sft"), "data.train": p["pref_train"], "data.eval": p["pref_eval"]}
    else:
      extra = {"model.init": d("sft"), "reward.init": d("reward"), "data.train": p["prompts_train"],
               "data.eval": p["prompts_eval"]}
    times[m] = run_stage(m, cfg(m), d(m), getattr(config, m), extra, count())
  for pol in ("sft",) + tuple(config.methods):
    extra = {"model.init": d(pol), "reference.init": d("sft"), "reward.init": d("reward"),
             "data.eval": p["prompts_eval"], "compare.init": d("sft")}
    times[f"eval_{pol}"] = run_stage(f"eval {pol}", cfg("evaluate"), d(f"eval_{pol}"), config.evaluate, extra,
                                     count())
  table = write_report(workdir, ("sft",) + tuple(config.methods), time.time() - t0, times)
  print_table(table)
  print(f"[pipeline] report: {os.path.join(workdir, 'report.md')}", flush=True)
  return table


def stage_times(workdir: str, times: dict) -> str:
  """'sft 95 s (compile 9 s), ...': each stage's wall time and the compile time its summary row reports
  (stages skipped as done already show their compile time only)."""
  out = []
  for name, secs in times.items():
    summary = rows(os.path.join(workdir, name), "summary")
    comp = summary[-1].get("compile_seconds") if summary else None
    wall = f"{secs:.0f} s" if secs else "done before"
    out.append(f"{name} {wall}" + (f" (compile {comp:.0f} s)" if comp is not None else ""))
  return ", ".join(out)


def _eval(workdir: str, pol: str) -> dict:
  with open(os.path.join(workdir, f"eval_{pol}", "eval.json")) as f:
    return json.load(f)["metrics"]


def _gold_win_rate(workdir: str, pol: str) -> tuple[float, float]:
  """Win rate against SFT with the gold reward as judge (same prompts, same order), and its standard error."""
  def load(name):
    with open(os.path.join(workdir, f"eval_{name}", "samples.jsonl")) as f:
      return [json.loads(x)[GOLD] for x in f]
  a, b = np.asarray(load(pol)), np.asarray(load("sft"))
  n = min(len(a), len(b))
  wins = (a[:n] > b[:n]) + 0.5 * (a[:n] == b[:n])
  return float(np.mean(wins)), float(wins.std(ddof=1) / np.sqrt(n)) if n > 1 else 0.0


def write_report(workdir: str, policies, seconds: float, times: dict) -> list[dict]:
  table = []
  for pol in policies:
    m = _eval(workdir, pol)
    win_gold, win_gold_se = _gold_win_rate(workdir, pol) if pol != "sft" else (0.5, 0.0)
    table.append({"policy": pol, "gold_reward": m.get(GOLD, float("nan")), "gold_reward_se": m.get(GOLD + "_se", 0.0),
                  "rm_score": m.get("score", float("nan")),
                  "win_rate_rm": m.get("win_rate", float("nan")) if pol != "sft" else 0.5,
                  "win_rate_rm_se": m.get("win_rate_se", 0.0) if pol != "sft" else 0.0,
                  "win_rate_gold": win_gold, "win_rate_gold_se": win_gold_se,
                  "kl": m.get("kl", 0.0), "fluent": m.get(FLUENT, float("nan")),
                  "length": m.get("response_length", float("nan"))})
  rm_eval = rows(os.path.join(workdir, "reward"), "eval")
  rm_acc = rm_eval[-1]["accuracy"] if rm_eval else float("nan")
  with open(os.path.join(workdir, "data", "task.json")) as f:
    agree = json.load(f)["label_agreement_eval"]
  plots = _plots(workdir, policies)
  lines = ["# jaxalign quickstart report", "",
           f"Built-in reviews task; tiny model trained from scratch. Total {seconds / 60:.1f} min.", "",
           "| policy | gold reward | RM score | win rate vs SFT (RM judge) | win rate vs SFT (gold judge) "
           "| KL to SFT | fluent | length |", "|---|---|---|---|---|---|---|---|"]
  for r in table:
    lines.append(f"| {r['policy']} | {r['gold_reward']:.3f} ± {r['gold_reward_se']:.3f} | {r['rm_score']:.3f} | "
                 f"{r['win_rate_rm']:.3f} ± {r['win_rate_rm_se']:.3f} | {r['win_rate_gold']:.3f} ± "
                 f"{r['win_rate_gold_se']:.3f} | {r['kl']:.2f} | {r['fluent']:.3f} | {r['length']:.1f} |")
  lines += ["", "± one standard error over the evaluation prompts.", "",
            f"Reward model held-out accuracy: {rm_acc:.3f} (gold agreement of the noisy labels: {agree:.3f}).",
            "", "Stage times: " + stage_times(workdir, times), ""]
  for title, fn in plots:
    lines += [f"![{title}]({fn})", ""]
  samples = []
  for pol in policies:
    with open(os.path.join(workdir, f"eval_{pol}", "samples.jsonl")) as f:
      s = [json.loads(x) for x in f][:3]
    samples += [f"- **{pol}**: `{x['prompt']}` -> `{x['completion'].strip()}` (gold {x[GOLD]:.2f})" for x in s]
  lines += ["## Samples", ""] + samples + [""]
  with open(os.path.join(workdir, "report.md"), "w") as f:
    f.write("\n".join(lines))
  with open(os.path.join(workdir, "summary.json"), "w") as f:
    json.dump({"table": table, "rm_accuracy": rm_acc, "label_agreement": agree, "seconds": seconds}, f, indent=2)
  return table


def _plots(workdir: str, policies) -> list[tuple[str, str]]:
  try:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
  except ImportError:
    logging.warning("matplotlib is not installed: report without plots")
    return []
  out = []
  fig, axes = plt.subplots(1, 4, figsize=(16, 3.4))
  sft = rows(os.path.join(workdir, "sft"), "train")
  axes[0].plot([r["step"] for r in sft], [r["loss"] for r in sft], label="train")
  sfe = rows(os.path.join(workdir, "sft"), "eval")
  axes[0].plot([r["step"] for r in sfe], [r["loss"] for r in sfe], "o-", label="eval")
  axes[0].set_title("SFT loss")
  axes[0].set_ylabel("cross-entropy (nats / token)")
  axes[0].legend()
  rm = rows(os.path.join(workdir, "reward"), "train")
  axes[1].plot([r["step"] for r in rm], [r["accuracy"] for r in rm], label="train")
  rme = rows(os.path.join(workdir, "reward"), "eval")
  axes[1].plot([r["step"] for r in rme], [r["accuracy"] for r in rme], "o-", label="eval")
  axes[1].set_title("reward model accuracy")
  axes[1].set_ylabel("pairwise accuracy")
  axes[1].legend()
  dpo = rows(os.path.join(workdir, "dpo"), "train")
  axes[2].plot([r["step"] for r in dpo], [r["rewards/margins"] for r in dpo], color=COLORS["dpo"], label="train")
  dpe = [r for r in rows(os.path.join(workdir, "dpo"), "eval") if "rewards/margins" in r]
  axes[2].plot([r["step"] for r in dpe], [r["rewards/margins"] for r in dpe], "o-", color="black", label="eval")
  axes[2].set_title("DPO reward margin")
  axes[2].set_ylabel("beta x (log-ratio chosen - rejected)")
  axes[2].legend()
  for m in ("ppo", "grpo"):
    tr = rows(os.path.join(workdir, m), "train")
    key = "score" if m == "ppo" else "reward"
    axes[3].plot([r["step"] for r in tr], [r.get(key, math.nan) for r in tr], color=COLORS[m], label=f"{m} {key}")
  axes[3].set_title("online RL: reward-model score")
  axes[3].set_ylabel("mean reward-model score")
  axes[3].legend()
  for a in axes:
    a.set_xlabel("step")
  fig.tight_layout()
  fig.savefig(os.path.join(workdir, "curves.png"), dpi=90)
  plt.close(fig)
  out.append(("training curves", "curves.png"))

  fig, ax = plt.subplots(figsize=(5.5, 4))
  for m in ("ppo", "grpo"):
    ev = [r for r in rows(os.path.join(workdir, m), "eval") if GOLD in r]
    if ev:
      ax.plot([r.get("kl", 0.0) for r in ev], [r[GOLD] for r in ev], "o-", color=COLORS[m],
              label=f"{m} (during training)")
  for pol in policies:  # One colour per method: its curve and its final star match.
    e = _eval(workdir, pol)
    ax.errorbar([e.get("kl", 0.0)], [e.get(GOLD, math.nan)], yerr=[e.get(GOLD + "_se", 0.0)], fmt="*",
                markersize=12, color=COLORS.get(pol, "gray"), label=f"{pol} (final eval ± s.e.)")
  ax.set_xlabel("KL to the SFT reference (nats / response)")
  ax.set_ylabel("mean gold reward")
  ax.set_title("gold reward vs KL")
  ax.legend(fontsize=8)
  fig.tight_layout()
  fig.savefig(os.path.join(workdir, "gold_vs_kl.png"), dpi=90)
  plt.close(fig)
  out.append(("gold reward vs KL", "gold_vs_kl.png"))
  return out


def print_table(table: list[dict]):
  head = f"{'policy':8s} {'gold':>7s} {'RM':>7s} {'win(RM)':>8s} {'win(gold)':>9s} {'KL':>6s} {'fluent':>7s}"
  print(head)
  print("-" * len(head))
  for r in table:
    print(f"{r['policy']:8s} {r['gold_reward']:7.3f} {r['rm_score']:7.3f} {r['win_rate_rm']:8.3f} "
          f"{r['win_rate_gold']:9.3f} {r['kl']:6.2f} {r['fluent']:7.3f}", flush=True)
