"""The compile plan: lower and compile a stage's real programs (its `build`, abstractly) for the local devices
or a named TPU topology, from any machine, and report what a run would need per chip.

  python launch/train.py --config=configs/sft.py --workdir=DIR --dry_run --topology=v5p-128

Per program: XLA's memory analysis (arguments, outputs, temporaries, peak) against the chip's HBM, XLA's
cost-model step time (TPU: `optimal_seconds`; a scanned layer body is counted once, so the time is
extrapolated from unrolled 1- and 2-layer compiles: T1 + (L - 1) (T2 - T1)), model FLOPs and the implied
MFU, collectives in the compiled HLO, and which attention kernel the HLO holds. Written to DIR/plan.json.
"""

from __future__ import annotations

import collections
import re

import jax
import numpy as np

from jaxalign import sharding, topology as topologies
from jaxalign.loops import stages

COLLECTIVES = ("all-gather", "all-reduce", "reduce-scatter", "all-to-all", "collective-permute")
_DTYPE_BYTES = {"pred": 1, "s8": 1, "u8": 1, "s16": 2, "u16": 2, "bf16": 2, "f16": 2, "s32": 4, "u32": 4,
                "f32": 4, "s64": 8, "u64": 8, "f64": 8}


def make_mesh(config, topo: topologies.Topology | None):
  """The configured mesh over the topology's devices (or the local ones)."""
  if topo is None:
    return sharding.mesh_from_config(config.mesh)
  m = config.mesh
  return sharding.make_mesh(m.data, m.fsdp, m.tensor, devices=topo.devices())


def compile_plan(config, topology: str = "", num_slices: int = 1, *, extrapolate: bool = True) -> dict:
  """Compile every program of the stage; see the module docstring for what each row holds."""
  topo = topologies.parse(topology, num_slices) if topology else None
  mesh = make_mesh(config, topo)
  parts = stages.module(config).build(config, "", mesh=mesh, abstract=True)
  chips = int(mesh.devices.size)
  out = {"stage": config.stage, "topology": topology or f"local ({jax.devices()[0].platform})",
         "num_slices": num_slices if topo else 1, "devices": chips, "mesh": dict(mesh.shape),
         "params_bytes_per_device": per_device_bytes(jax.tree.leaves(parts.state.params)),
         "opt_state_bytes_per_device": per_device_bytes(jax.tree.leaves(parts.state.opt_state)),
         "frozen_bytes_per_device": per_device_bytes(jax.tree.leaves(parts.state.frozen)), "programs": {}}
  if topo is not None:
    out["chip"] = {"name": topo.chip.name, "hbm_bytes": topo.chip.hbm_bytes, "peak_flops": topo.chip.peak_flops}
  compiled = {name: fn.lower(*args).compile() for name, (fn, args) in parts.programs.items()}
  for name, c in compiled.items():
    out["programs"][name] = _row(c, topo)
  layers = _num_layers(config)
  if extrapolate and layers > 2 and topo is not None:
    times = [_program_times(config, mesh, n) for n in (1, 2)]
    for name, row in out["programs"].items():
      if name in times[0] and name in times[1]:
        t1, t2 = times[0][name], times[1][name]
        row["step_seconds"] = t1 + (layers - 1) * (t2 - t1)
        row["step_seconds_from"] = f"unrolled 1- and 2-layer compiles: {t1:.4g} + {layers - 1} x ({t2:.4g} - {t1:.4g})"
  for name, row in out["programs"].items():
    flops = _model_flops(config, name, layers)
    if flops:
      row["model_flops"] = flops
      if topo is not None and row.get("step_seconds"):
        row["mfu"] = flops / (chips * topo.chip.peak_flops * row["step_seconds"])
    if topo is not None and "peak_bytes" in row:
      row["hbm_fraction"] = row["peak_bytes"] / topo.chip.hbm_bytes
      row["fits"] = row["peak_bytes"] <= topo.chip.hbm_bytes
      if not row["fits"]:
        row["advice"] = advice(config, row, topo)
  return out


def _row(compiled, topo) -> dict:
  row = {}
  mem = compiled.memory_analysis()
  if mem is not None:
    row = {"argument_bytes": int(mem.argument_size_in_bytes), "output_bytes": int(mem.output_size_in_bytes),
           "alias_bytes": int(mem.alias_size_in_bytes), "temp_bytes": int(mem.temp_size_in_bytes)}
    row["peak_bytes"] = row["argument_bytes"] + row["output_bytes"] - row["alias_bytes"] + row["temp_bytes"]
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) and cost else (cost or {})
  row["xla_flops_per_device"] = float(cost.get("flops", 0.0))
  if topo is not None and cost.get("optimal_seconds"):
    row["step_seconds"] = float(cost["optimal_seconds"])
    row["step_seconds_from"] = "XLA's TPU cost model (a scanned layer body counted once)"
  hlo = compiled.as_text() or ""
  row["collectives"] = collective_counts(hlo)
  row["largest_all_gathers"] = largest(hlo, "all-gather")
  row["attention"] = attention_kind(hlo)
  return row


def _program_times(config, mesh, layers: int) -> dict:
  """Cost-model seconds of each program with the model cut to `layers` unrolled layers."""
  c = config.copy_and_resolve_references()
  with c.unlocked():
    c.model.plan_layers = layers  # Read by setup.resolve_model_config; plans only.
  parts = stages.module(c).build(c, "", mesh=mesh, abstract=True)
  out = {}
  for name, (fn, args) in parts.programs.items():
    cost = fn.lower(*args).compile().cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) and cost else (cost or {})
    if cost.get("optimal_seconds"):
      out[name] = float(cost["optimal_seconds"])
  return out


def _num_layers(config) -> int:
  from jaxalign.loops import setup
  return setup.resolve_model_config(config.model.init, config.model).num_layers


def _model_flops(config, program: str, layers: int) -> float:
  """Model FLOPs of one train step (6 N per trained token plus causal attention), the usual MFU convention;
  0 for programs that do not train (sampling)."""
  from jaxalign.loops import setup
  if program not in ("train_step",):
    return 0.0
  cfg = setup.resolve_model_config(config.model.init, config.model)
  rows = config.train.batch_size * (2 if config.stage in ("reward", "dpo") else 1)
  t = config.train.seq_len
  attn = 6 * layers * t * cfg.num_heads * cfg.head_dim  # Causal: half of 12 L T D per token.
  return float(rows * t * (6 * cfg.num_params() + attn))


def collective_counts(hlo: str) -> dict:
  """How many of each collective op the compiled HLO runs (async starts counted once)."""
  counts = collections.Counter()
  for op in COLLECTIVES:
    counts[op] = len(re.findall(rf"= [^=]*?\b{op}(?:-start)?\(", hlo))
  return {k: v for k, v in counts.items() if v}


def largest(hlo: str, op: str, n: int = 3) -> list[dict]:
  """The `n` largest results of `op` in the HLO, by bytes per device."""
  found = []
  for m in re.finditer(rf"= \(?([a-z0-9]+)\[([0-9,]*)\][^=]*?\b{op}(?:-start)?\(", hlo):
    dims = [int(x) for x in m.group(2).split(",") if x]
    found.append({"shape": dims, "dtype": m.group(1),
                  "bytes": int(np.prod(dims or [1])) * _DTYPE_BYTES.get(m.group(1), 4)})
  return sorted(found, key=lambda r: -r["bytes"])[:n]


def attention_kind(hlo: str) -> str:
  if "splash" in hlo or "tpu_custom_call" in hlo:
    return "pallas (tpu_custom_call)"
  if "cudnn" in hlo.lower() and "fmha" in hlo.lower():
    return "cudnn fused attention"
  return "XLA dots and softmax"


def advice(config, row: dict, topo) -> str:
  """Which knob to turn first when a program does not fit."""
  over = row["peak_bytes"] / topo.chip.hbm_bytes
  knobs = []
  if config.model.remat == "none":
    knobs.append("model.remat=full (recompute activations in the backward pass)")
  if config.mesh.data > 1:
    knobs.append("more of the mesh on fsdp (mesh.data=1 mesh.fsdp=-1): params and optimizer state shard further")
  if config.train.get("grad_accum", 1) == 1 and config.train.batch_size > 1:
    knobs.append("train.grad_accum=2 or more (fewer rows in flight per device)")
  knobs.append("a shorter train.seq_len, or a larger slice")
  return f"needs {over:.1f}x the chip's {topo.chip.hbm_bytes / 2**30:.0f} GiB: try " + "; ".join(knobs)


def per_device_bytes(leaves) -> int:
  """Bytes one device holds of abstract sharded leaves (the largest shard of each)."""
  total = 0
  for x in leaves:
    s = getattr(x, "sharding", None)
    shape = s.shard_shape(x.shape) if s is not None else x.shape
    total += int(np.prod(shape)) * np.dtype(x.dtype).itemsize
  return total
