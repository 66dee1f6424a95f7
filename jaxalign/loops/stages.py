"""The one table of stages: name -> module with `build(config, workdir, *, mesh=None, abstract=False) -> Parts`.

`train` runs a stage through the one driver (evaluate through its own `run`: it samples, it does not train);
`jaxalign.plan.compile_plan` lowers and compiles a stage's programs from the same builds (`--dry_run`).
"""

from __future__ import annotations

from jaxalign import compile_cache
from jaxalign.errors import ConfigError
from jaxalign.loops import driver, dpo, evaluate, grpo, ppo, reward, sft

STAGES = {"sft": sft, "reward": reward, "dpo": dpo, "ppo": ppo, "grpo": grpo, "evaluate": evaluate}


def module(config):
  if config.stage not in STAGES:
    raise ConfigError(f"stage={config.stage!r}: expected one of {', '.join(STAGES)}")
  return STAGES[config.stage]


def train(config, workdir: str):
  """Run the configured stage to the end (or to train.run_steps); returns its final state (evaluate: metrics)."""
  mod = module(config)
  compile_cache.listen()
  before = compile_cache.totals()  # The summary row reports this stage's compile time and cache hits.
  if mod is evaluate:
    return evaluate.run(config, workdir, compile_since=before)
  return driver.run(mod.build(config, workdir), config, workdir, compile_since=before)
