"""The verifiable-reward quickstart (`configs/quickstart.py:arithmetic`): SFT on imperfect demonstrations, GRPO
with the exact-answer verifier, both policies evaluated on held-out problems; a report with plots.

Why imperfect demonstrations: 30% of the SFT answers have one wrong digit, as a weaker demonstrator's would.
SFT imitates them, slips included; the verifier knows the right answer, so GRPO can raise accuracy above
what imitation reaches. Every stage is an ordinary `launch/train.py` run (resumable as the main quickstart).
"""

from __future__ import annotations

import json
import logging
import os
import time

from jaxalign import configs
from jaxalign.quickstart import COLORS, rows, run_stage, stage_times

ACC = "reward/exact_answer"


def run(config, workdir: str) -> list[dict]:
  from jaxalign.data.tasks import arithmetic

  workdir = os.path.abspath(workdir)
  os.makedirs(workdir, exist_ok=True)
  data = os.path.join(workdir, "data")
  t0 = time.time()
  if not os.path.exists(os.path.join(data, "task.json")):
    arithmetic.write_task(data, seed=config.seed, **{k: v for k, v in config.task.items() if k != "name"})
  p = {k: os.path.join(data, f"{k}.jsonl") for k in ("sft_train", "sft_eval", "prompts_train", "prompts_eval")}
  d = lambda s: os.path.join(workdir, s)  # noqa: E731
  cfg = configs.path
  n = 2 + 2 * len(config.methods)  # SFT, each method, the evaluation of SFT and of each method.
  k = iter(range(1, n + 1))
  count = lambda: f"{next(k)}/{n}"  # noqa: E731
  times = {"sft": run_stage("sft", cfg("sft"), d("sft"), config.sft, {
      "model.tokenizer": os.path.join(data, "tokenizer"), "data.train": p["sft_train"], "data.eval": p["sft_eval"]},
      count())}
  for m in config.methods:
    times[m] = run_stage(m, cfg(m), d(m), getattr(config, m), {
        "model.init": d("sft"), "data.train": p["prompts_train"], "data.eval": p["prompts_eval"]}, count())
  for pol in ("sft",) + tuple(config.methods):
    times[f"eval_{pol}"] = run_stage(f"eval {pol}", cfg("evaluate"), d(f"eval_{pol}"), config.evaluate, {
        "model.init": d(pol), "reference.init": d("sft"), "data.eval": p["prompts_eval"]}, count())
  table = write_report(workdir, ("sft",) + tuple(config.methods), time.time() - t0, times,
                       config.evaluate.eval.samples_per_prompt)
  head = f"{'policy':8s} {'accuracy':>9s} {'pass@k':>7s} {'no EOS':>7s} {'length':>7s}"
  print(head + "\n" + "-" * len(head))
  for r in table:
    print(f"{r['policy']:8s} {r['accuracy']:9.3f} {r['pass_at_k']:7.3f} {r['truncated']:7.3f} {r['length']:7.2f}",
          flush=True)
  print(f"[pipeline] report: {os.path.join(workdir, 'report.md')}", flush=True)
  return table


def _eval(workdir: str, pol: str) -> dict:
  with open(os.path.join(workdir, f"eval_{pol}", "eval.json")) as f:
    return json.load(f)["metrics"]


def write_report(workdir: str, policies, seconds: float, times: dict, k: int) -> list[dict]:
  table = []
  for pol in policies:
    m = _eval(workdir, pol)
    table.append({"policy": pol, "accuracy": m[ACC], "accuracy_se": m[ACC + "_se"],
                  "pass_at_k": m.get(f"pass@{k}/exact_answer", float("nan")),
                  "pass_at_k_se": m.get(f"pass@{k}/exact_answer_se", 0.0), "truncated": m["no_eos_fraction"],
                  "length": m["response_length"], "kl": m.get("kl", 0.0)})
  with open(os.path.join(workdir, "data", "task.json")) as f:
    task = json.load(f)
  lines = ["# jaxalign quickstart report: verifiable rewards", "",
           f"Built-in arithmetic task ({task['digits']}-digit addition, answers least significant digit first); "
           f"SFT on demonstrations of which {task['noise']:.0%} have a wrong digit, then GRPO with the "
           f"exact-answer verifier. Held-out problems, {k} samples each at temperature 1. "
           f"Total {seconds / 60:.1f} min.", "",
           f"| policy | accuracy (mean@{k}) | pass@{k} | no EOS (truncated) | length (tokens) | KL to SFT |",
           "|---|---|---|---|---|---|"]
  for r in table:
    lines.append(f"| {r['policy']} | {r['accuracy']:.3f} ± {r['accuracy_se']:.3f} | {r['pass_at_k']:.3f} ± "
                 f"{r['pass_at_k_se']:.3f} | {r['truncated']:.3f} | {r['length']:.2f} | {r['kl']:.2f} |")
  lines += ["", "± one standard error over the evaluation samples (accuracy) or problems (pass@k).", "",
            "Stage times: " + stage_times(workdir, times), ""]
  for title, fn in _plots(workdir, policies, k):
    lines += [f"![{title}]({fn})", ""]
  lines += ["## Samples", ""]
  for pol in policies:
    with open(os.path.join(workdir, f"eval_{pol}", "samples.jsonl")) as f:
      s = [json.loads(x) for x in f][:3]
    lines += [f"- **{pol}**: `{x['prompt']}` -> `{x['completion'].strip()}` (exact {x[ACC]:.0f})" for x in s]
  with open(os.path.join(workdir, "report.md"), "w") as f:
    f.write("\n".join(lines + [""]))
  with open(os.path.join(workdir, "summary.json"), "w") as f:
    json.dump({"table": table, "seconds": seconds, "task": task}, f, indent=2)
  return table


def _plots(workdir: str, policies, k: int) -> list[tuple[str, str]]:
  try:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
  except ImportError:
    logging.warning("matplotlib is not installed: report without plots")
    return []
  fig, axes = plt.subplots(1, 4, figsize=(16, 3.4))
  sft = rows(os.path.join(workdir, "sft"), "train")
  axes[0].plot([r["step"] for r in sft], [r["loss"] for r in sft], color=COLORS["sft"])
  axes[0].set_title("SFT loss")
  axes[0].set_ylabel("cross-entropy (nats / token)")
  tr, ev = rows(os.path.join(workdir, "grpo"), "train"), rows(os.path.join(workdir, "grpo"), "eval")
  axes[1].plot([r["step"] for r in tr], [r.get(ACC, float("nan")) for r in tr], color=COLORS["grpo"],
               label="train (sampled groups)")
  axes[1].errorbar([r["step"] for r in ev], [r[ACC] for r in ev], yerr=[r.get(ACC + "_se", 0) for r in ev],
                   fmt="o-", color="black", label=f"held-out (mean@{k})")
  pk = f"pass@{k}/exact_answer"
  if any(pk in r for r in ev):
    axes[1].plot([r["step"] for r in ev if pk in r], [r[pk] for r in ev if pk in r], "s:", color="black",
                 label=f"held-out pass@{k}")
  for pol in policies:
    e = _eval(workdir, pol)
    axes[1].axhline(e[ACC], color=COLORS.get(pol, "gray"), ls="--", lw=1, label=f"{pol} final eval (mean@{k})")
  axes[1].set_title("GRPO: exact-answer accuracy, pass@k")
  axes[1].set_ylabel("fraction correct")
  axes[1].legend(fontsize=7)
  axes[2].plot([r["step"] for r in tr], [r["no_eos_fraction"] for r in tr], color=COLORS["grpo"], label="train")
  axes[2].plot([r["step"] for r in ev], [r["no_eos_fraction"] for r in ev], "o-", color="black", label="held-out")
  axes[2].set_title("truncation rate (no EOS)")
  axes[2].set_ylabel("fraction of completions")
  axes[2].legend(fontsize=7)
  axes[3].plot([r["step"] for r in tr], [r["response_length"] for r in tr], color=COLORS["grpo"], label="mean")
  axes[3].plot([r["step"] for r in tr], [r["response_length_max"] for r in tr], ":", color=COLORS["grpo"],
               label="max")
  axes[3].set_title("response length")
  axes[3].set_ylabel("tokens")
  axes[3].legend(fontsize=7)
  for a in axes:
    a.set_xlabel("step")
  fig.tight_layout()
  fig.savefig(os.path.join(workdir, "curves.png"), dpi=90)
  plt.close(fig)
  return [("training curves", "curves.png")]
