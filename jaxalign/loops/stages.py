"""The one table of stages: name -> module with `build(config, workdir, *, mesh=None, abstract=False) -> Parts`.

`train` runs a stage through the one driver (evaluate through its own `run`: it samples, it does not train);
`plan` lowers and compiles a stage's programs without reading weights or data (`launch/train.py --dry_run`).
"""

from __future__ import annotations

import jax
import numpy as np

from jaxalign.loops import driver, dpo, evaluate, grpo, ppo, reward, sft

STAGES = {"sft": sft, "reward": reward, "dpo": dpo, "ppo": ppo, "grpo": grpo, "evaluate": evaluate}


def module(config):
  if config.stage not in STAGES:
    raise ValueError(f"stage={config.stage!r}: expected one of {', '.join(STAGES)}")
  return STAGES[config.stage]


def train(config, workdir: str):
  """Run the configured stage to the end (or to train.run_steps); returns its final state (evaluate: metrics)."""
  mod = module(config)
  if mod is evaluate:
    return evaluate.run(config, workdir)
  return driver.run(mod.build(config, workdir), config, workdir)


def plan(config, mesh=None) -> dict:
  """Compile each of the stage's programs for `mesh` (default: the configured mesh over the local devices)
  from shapes alone; per program: memory per device (XLA's analysis) and the program's cost analysis."""
  parts = module(config).build(config, "", mesh=mesh, abstract=True)
  out = {"stage": config.stage, "mesh": dict(parts.mesh.shape), "devices": int(parts.mesh.devices.size),
         "params_bytes_per_device": per_device_bytes(jax.tree.leaves(parts.state.params)),
         "opt_state_bytes_per_device": per_device_bytes(jax.tree.leaves(parts.state.opt_state)),
         "frozen_bytes_per_device": per_device_bytes(jax.tree.leaves(parts.state.frozen)), "programs": {}}
  for name, (fn, args) in parts.programs.items():
    compiled = fn.lower(*args).compile()
    mem = compiled.memory_analysis()
    row = {}
    if mem is not None:
      row = {"argument_bytes": int(mem.argument_size_in_bytes), "output_bytes": int(mem.output_size_in_bytes),
             "alias_bytes": int(mem.alias_size_in_bytes), "temp_bytes": int(mem.temp_size_in_bytes)}
      row["peak_bytes"] = row["argument_bytes"] + row["output_bytes"] - row["alias_bytes"] + row["temp_bytes"]
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) and cost else cost
    if cost:
      row["flops"] = float(cost.get("flops", 0.0))
    out["programs"][name] = row
  return out


def per_device_bytes(leaves) -> int:
  """Bytes one device holds of abstract sharded leaves (the largest shard of each)."""
  total = 0
  for x in leaves:
    s = getattr(x, "sharding", None)
    shape = s.shard_shape(x.shape) if s is not None else x.shape
    total += int(np.prod(shape)) * np.dtype(x.dtype).itemsize
  return total
