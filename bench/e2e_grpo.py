"""A small GRPO run end to end, jaxalign's CLI beside TRL's GRPOTrainer: process start to exported model.

  python3 bench/e2e_grpo.py [--steps=60] [--shape=bench|small] [--out=bench/e2e_grpo.json]

Same work on both sides: the bench's 4-layer Llama (bench.workloads; float32, saved as a Hugging Face
directory with its tokenizer), the same prompt texts (~64 tokens), 8 prompts x 4 completions of 64 new tokens
per iteration, the bench's Python reward, KL to the reference (beta 0.04), AdamW at a constant 1e-5, no
gradient clipping, one update per generation, no evaluation, the model saved at the end. Each run is a fresh
process timed from its start to its exit (imports, loading, compiling, training, export); jaxalign runs twice,
first with an empty compilation cache (cold) and then again in the same environment (its persistent cache
warm), as a user's second run would. `--shape=small`: the quickstart's 0.9M-parameter width (hidden 128, 4
layers) with 16 prompts x 4 completions of 32 new tokens, the scale where compilation is most of a run.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, ROOT)

from bench import workloads as W  # noqa: E402

SHAPES = {"bench": {}, "small": {"HIDDEN": 128, "INTER": 344, "HEADS": 4, "KV_HEADS": 2, "RL_PROMPTS": 16,
                                 "RL_NEW": 32}}


def use_shape(name: str) -> None:
  for key, value in SHAPES[name].items():
    setattr(W, key, value)


def prepare(root: str, steps: int) -> tuple[str, str]:
  """The model directory (weights + tokenizer) and the prompts file both sides read."""
  model_dir, prompts = os.path.join(root, "model"), os.path.join(root, "prompts.jsonl")
  tok = W._trl_tokenizer()
  W._torch_model().save_pretrained(model_dir)
  tok.save_pretrained(model_dir)
  with open(prompts, "w") as f:
    for p in W._rl_prompts(tok, W.RL_PROMPTS * (steps + 4)):
      f.write(json.dumps({"prompt": p}) + "\n")
  return model_dir, prompts


def jaxalign_cmd(model_dir: str, prompts: str, workdir: str, steps: int) -> list[str]:
  return [sys.executable, "launch/train.py", "--config=configs/grpo.py", f"--workdir={workdir}",
          f"--config.model.init={model_dir}", f"--config.data.train={prompts}", "--config.data.eval_fraction=0.0",
          "--config.reward.functions=('bench.workloads:length_reward',)", f"--config.train.steps={steps}",
          f"--config.train.batch_size={W.RL_PROMPTS}", f"--config.grpo.group_size={W.GROUP}",
          f"--config.rollout.prompt_len={W.RL_PROMPT_LEN}", f"--config.train.seq_len={W.RL_PROMPT_LEN + W.RL_NEW}",
          f"--config.optimizer.learning_rate={W.LR}", "--config.optimizer.clip_norm=0.0", "--config.eval.every=0",
          f"--config.checkpoint.every={steps}", "--config.logging.progress=False", "--config.logging.report=False",
          "--config.logging.tensorboard=False"]


def trl_main(model_dir: str, prompts: str, out_dir: str, steps: int, shape: str = "bench") -> None:
  """TRL's side, run in its own process: GRPOTrainer from the same directory and prompts, then save."""
  use_shape(shape)
  import datasets
  import transformers
  import trl
  tok = transformers.AutoTokenizer.from_pretrained(model_dir)
  ds = datasets.load_dataset("json", data_files=prompts, split="train")
  args = trl.GRPOConfig(per_device_train_batch_size=W.RL_PROMPTS * W.GROUP, num_generations=W.GROUP,
                        max_completion_length=W.RL_NEW, temperature=1.0, top_k=0, beta=0.04, num_iterations=1,
                        steps_per_generation=1, shuffle_dataset=False,
                        **{**W._trl_common(steps), "max_steps": steps, "output_dir": out_dir})
  trainer = trl.GRPOTrainer(model=model_dir, reward_funcs=W.length_reward, args=args, train_dataset=ds,
                            processing_class=tok)
  trainer.train()
  trainer.save_model(os.path.join(out_dir, "export"))


def _timed(cmd: list[str], env: dict) -> float:
  t = time.perf_counter()
  out = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
  seconds = time.perf_counter() - t
  if out.returncode:
    raise SystemExit(f"{cmd[:3]} failed ({out.returncode}):\n{out.stderr[-3000:]}")
  return seconds


def main() -> None:
  ap = argparse.ArgumentParser()
  ap.add_argument("--steps", type=int, default=60)
  ap.add_argument("--shape", default="bench", choices=sorted(SHAPES))
  ap.add_argument("--out", default=os.path.join(HERE, "e2e_grpo.json"))
  a = ap.parse_args()
  use_shape(a.shape)
  root = tempfile.mkdtemp(prefix="e2e_grpo_")
  model_dir, prompts = prepare(root, a.steps)
  env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""), JAX_PLATFORMS="cpu",
             JAXALIGN_COMPILE_CACHE=os.path.join(root, "xla_cache"))
  res = {"steps": a.steps, "samples_per_iteration": W.RL_PROMPTS * W.GROUP, "cpu": _cpu(),
         "time": time.strftime("%Y-%m-%d %H:%M"), "command": f"python3 bench/e2e_grpo.py --steps={a.steps} --shape={a.shape}", "shape": a.shape}
  res["trl_s"] = _timed([sys.executable, "-c", "import sys; sys.path.insert(0, '.'); from bench.e2e_grpo import "
                         f"trl_main; trl_main({model_dir!r}, {prompts!r}, {os.path.join(root, 'trl')!r}, {a.steps}, {a.shape!r})"],
                        env)
  res["jaxalign_cold_s"] = _timed(jaxalign_cmd(model_dir, prompts, os.path.join(root, "ja1"), a.steps), env)
  res["jaxalign_warm_s"] = _timed(jaxalign_cmd(model_dir, prompts, os.path.join(root, "ja2"), a.steps), env)
  for run in ("ja1", "ja2"):
    for line in open(os.path.join(root, run, "metrics.jsonl")):
      row = json.loads(line)
      if "compile_seconds" in row:
        res[f"{run}_compile_s"] = row["compile_seconds"]
  print(json.dumps(res, indent=1))
  with open(a.out, "w") as f:
    json.dump(res, f, indent=1)


def _cpu() -> str:
  from bench.run import cpu_model
  return cpu_model()


if __name__ == "__main__":
  main()
