"""The compile plan: lower and compile a stage's real programs (its `build`, abstractly) for the local devices
or a named TPU topology, from any machine, and report what a run would need per chip.

  python launch/train.py --config=configs/sft.py --workdir=DIR --dry_run --topology=v5p-128

Per program: XLA's memory analysis (arguments, outputs, temporaries; on TPU the peak is libtpu's own
`peak_memory_in_bytes`, elsewhere arguments + outputs - aliased + temporaries) against the chip's HBM, XLA's
cost-model step time (TPU: `optimal_seconds`; a scanned layer body is counted once, so the time is
extrapolated from unrolled 1- and 2-layer compiles: T1 + (L - 1) (T2 - T1), or with --step_time=unrolled
taken from the whole model compiled unrolled), model FLOPs and the implied MFU, collectives in the compiled
HLO, and which attention kernel the HLO holds. Written to DIR/plan.json.

Why both: the per-layer margin T2 - T1 is not exactly one layer's cost (the cost model's schedule around a
layer depends on its neighbours: Llama-3-8B's margin came out 19.8-20.4 ms for the same layer in different
programs), so the extrapolation is good to about 1%; the unrolled whole model is exact to the cost model but
compiles for minutes (3.5 min for an 8B model on 2 CPU cores).
"""

from __future__ import annotations

import collections
import re

import jax
import numpy as np

from jaxalign import compile_cache, sharding, topology as topologies
from jaxalign.loops import stages
from jaxalign.models import moe

COLLECTIVES = ("all-gather", "all-reduce", "reduce-scatter", "all-to-all", "collective-permute")
_DTYPE_BYTES = {"pred": 1, "s8": 1, "u8": 1, "s16": 2, "u16": 2, "bf16": 2, "f16": 2, "s32": 4, "u32": 4,
                "f32": 4, "s64": 8, "u64": 8, "f64": 8}


def make_mesh(config, topo: topologies.Topology | None):
  """The configured mesh over the topology's devices (or the local ones)."""
  if topo is None:
    return sharding.mesh_from_config(config.mesh)
  m = config.mesh
  return sharding.make_mesh(m.data, m.fsdp, m.tensor, devices=topo.devices(), expert=m.get("expert", 1))


STEP_TIMES = ("extrapolated", "unrolled", "none")


def compile_plan(config, topology: str = "", num_slices: int = 1, *, extrapolate: bool = True,
                 step_time: str = "extrapolated") -> dict:
  """Compile every program of the stage; see the module docstring for what each row holds.
  `step_time`: how the TPU step time is priced (STEP_TIMES; `extrapolate=False` is "none")."""
  if step_time not in STEP_TIMES:
    raise ValueError(f"step_time={step_time!r}: one of {', '.join(STEP_TIMES)}")
  topo = topologies.parse(topology, num_slices) if topology else None
  if topo is None:
    return _plan(config, topo, extrapolate, step_time)
  with compile_cache.no_new_entries():  # A topology's programs cannot be loaded back without its chips.
    return _plan(config, topo, extrapolate, step_time)


def _plan(config, topo, extrapolate: bool, step_time: str) -> dict:
  mesh = make_mesh(config, topo)
  parts = stages.module(config).build(config, "", mesh=mesh, abstract=True)
  devices = int(mesh.devices.size)
  out = {"stage": config.stage, "topology": topo.name if topo else f"local ({jax.devices()[0].platform})",
         "num_slices": topo.num_slices if topo else 1, "devices": devices, "mesh": dict(mesh.shape),
         "params_total": int(sum(np.prod(x.shape) for x in jax.tree.leaves(parts.state.params))),
         "params_bytes_per_device": per_device_bytes(jax.tree.leaves(parts.state.params)),
         "opt_state_bytes_per_device": per_device_bytes(jax.tree.leaves(parts.state.opt_state)),
         "frozen_bytes_per_device": per_device_bytes(jax.tree.leaves(parts.state.frozen)), "programs": {}}
  hbm = peak = 0.0
  if topo is not None:  # Per device: a v4 chip shows up as two devices (its TensorCores), others as one.
    hbm = topo.chip.hbm_bytes * topo.chips / devices
    peak = topo.chip.peak_flops * topo.chips / devices
    out["chip"] = {"name": topo.chip.name, "chips": topo.chips, "hbm_bytes_per_device": int(hbm),
                   "peak_flops_per_device": peak}
  for name, (fn, args) in parts.programs.items():
    sharding.UNSHARDED_BATCHES.clear()
    try:
      with jax.set_mesh(mesh):
        out["programs"][name] = _row(fn.lower(*args).compile(), topo)
    except Exception as e:  # The TPU compiler refuses a program that cannot fit: report it, do not crash.
      out["programs"][name] = _oom_row(str(e), args)
    if sharding.UNSHARDED_BATCHES:
      dp = sharding.data_parallel_size(mesh)
      shapes = sorted(sharding.UNSHARDED_BATCHES)
      out["programs"][name]["warning"] = (
          f"activations of {len(shapes)} shape(s), e.g. {list(shapes[0])}, have a batch of rows the "
          f"{dp} data-parallel devices do not divide: every device holds and computes all of them. Make the "
          "rows per pass (train.batch_size, x grpo.group_size, / minibatches) a multiple of " + str(dp))
  layers = _num_layers(config)
  if extrapolate and step_time == "unrolled" and topo is not None:
    _unrolled(config, mesh, out["programs"])
  elif extrapolate and step_time == "extrapolated" and layers > 2 and topo is not None:
    _extrapolate(config, mesh, out["programs"])
  elif step_time == "none":  # The compiled program's own time counts a scanned layer once: not a step time.
    for row in out["programs"].values():
      if row.pop("step_seconds", None) is not None:
        row["step_seconds_from"] = "not priced (--step_time=none)"
  for name, row in out["programs"].items():
    flops = _model_flops(config, name, layers)
    if flops:
      row["model_flops"] = flops
      if topo is not None and row.get("step_seconds"):
        row["mfu"] = flops / (devices * peak * row["step_seconds"])
    if topo is not None and "peak_bytes" in row:
      row["hbm_fraction"] = row["peak_bytes"] / hbm
      row["fits"] = row["peak_bytes"] <= hbm
      if not row["fits"]:
        row["advice"] = advice(config, row, hbm)
  return out


def _row(compiled, topo) -> dict:
  row = {}
  mem = compiled.memory_analysis()
  if mem is not None:
    row = {"argument_bytes": int(mem.argument_size_in_bytes), "output_bytes": int(mem.output_size_in_bytes),
           "alias_bytes": int(mem.alias_size_in_bytes), "temp_bytes": int(mem.temp_size_in_bytes)}
    row["peak_bytes"] = row["argument_bytes"] + row["output_bytes"] - row["alias_bytes"] + row["temp_bytes"]
    xla_peak = int(getattr(mem, "peak_memory_in_bytes", 0) or 0)
    if topo is not None and xla_peak > 0:
      # libtpu's own peak of the program's heap with its arguments. libtpu 0.0.42's temp_size can count
      # more than that heap (Llama-3-8B's SFT step: 4.88 GiB of "temporaries" for a 3.57 GiB heap in its
      # buffer assignment; libtpu 0.0.52 reports 3.62 for the same program), so the sum overstates the need.
      row["sum_bytes"] = row["peak_bytes"]
      row["peak_bytes"] = xla_peak
  cost = _cost(compiled)
  row["xla_flops_per_device"] = float(cost.get("flops", 0.0))
  if topo is not None and cost.get("optimal_seconds", 0) > 0:
    row["step_seconds"] = float(cost["optimal_seconds"])
    row["step_seconds_from"] = "XLA's TPU cost model (a scanned layer body counted once)"
  hlo = compiled.as_text() or ""
  row["collectives"] = collective_counts(hlo)
  row["largest_all_gathers"] = largest(hlo, "all-gather")
  row["attention"] = attention_kind(hlo)
  row["kernels"] = pallas_kernels(hlo)
  return row


def _oom_row(message: str, args) -> dict:
  """A program the compiler refused for memory: its temporaries as the compiler reported them."""
  m = re.search(r"HLO temporaries \(([0-9.]+)([KMGT])\) exceeds available HBM \(([0-9.]+)([KMGT])\)", message)
  if not m:
    raise ValueError(f"compiling the plan failed: {message.splitlines()[0] if message else ''}")
  unit = {"K": 2**10, "M": 2**20, "G": 2**30, "T": 2**40}
  temp = int(float(m.group(1)) * unit[m.group(2)])
  arguments = per_device_bytes(jax.tree.leaves(args))
  return {"compile_error": "the compiler ran out of HBM: " + m.group(0), "temp_bytes": temp,
          "argument_bytes": arguments, "output_bytes": 0, "alias_bytes": 0, "peak_bytes": temp + arguments}


def _extrapolate(config, mesh, rows: dict) -> None:
  """Whole-model step time and collective bytes from unrolled cut models (XLA's cost model counts a scanned
  layer body once). One kind of layer: T1 + (L - 1)(T2 - T1). Mixed kinds (sliding and global attention): the
  first layer's kind k0 alone gives T1; [k0, k] gives each kind's marginal cost m_k = T(k0, k) - T1; the model
  is T1 + sum over kinds of (count_k - [k = k0]) m_k."""
  from jaxalign.loops import setup
  experts = setup.resolve_model_config(config.model.init, config.model).num_experts
  types = _layer_types(config)
  kinds = list(dict.fromkeys(types))
  k0 = types[0]
  base = _program_times(config, mesh, [k0], len(kinds) == 1)
  pairs = {k: _program_times(config, mesh, [k0, k], len(kinds) == 1) for k in kinds}
  counts = collections.Counter(types)
  weights = {k: counts[k] - (k == k0) for k in kinds}
  for name, row in rows.items():
    if name not in base or any(name not in pairs[k] for k in kinds):
      continue
    t1, b1 = base[name]
    margins = {k: pairs[k][name][0] - t1 for k in kinds}
    if t1 > 0 and all(m > 0 for m in margins.values()):
      row["step_seconds"] = t1 + sum(weights[k] * margins[k] for k in kinds)
      terms = " + ".join(f"{weights[k]} x {margins[k]:.4g}" + (f" ({k})" if len(kinds) > 1 else "")
                         for k in kinds)
      row["step_seconds_from"] = f"unrolled cut models: {t1:.4g} (first layer) + {terms}"
      if experts:
        row["step_seconds_from"] += (" (expert matmuls priced as a balanced batched matmul, every expert the "
                                     "same rows: the cost model sees neither inside megablox nor past its "
                                     "group-metadata scatter)")
    else:  # Seen with libtpu 0.0.42 on v5e-256: negative times. No time rather than a wrong one.
      row.pop("step_seconds", None)
      row["step_seconds_from"] = (f"none: the cost model gave {t1:.4g} s for one layer and layer margins "
                                  f"{ {k: round(m, 6) for k, m in margins.items()} } for this topology")
    ops = set(b1).union(*(pairs[k][name][1] for k in kinds))
    row["collective_bytes_per_step"] = {
        op: b1.get(op, 0) + sum(weights[k] * (pairs[k][name][1].get(op, 0) - b1.get(op, 0)) for k in kinds)
        for op in sorted(ops)}


def _unrolled(config, mesh, rows: dict) -> None:
  """Whole-model step time and collective bytes from the whole model compiled with its layers unrolled."""
  types = list(_layer_types(config))
  full = _program_times(config, mesh, types, len(set(types)) == 1)
  for name, row in rows.items():
    if name not in full:
      continue
    t, b = full[name]
    if t > 0:
      row["step_seconds"] = t
      row["step_seconds_from"] = f"the whole model unrolled ({len(types)} layers)"
    else:
      row.pop("step_seconds", None)
      row["step_seconds_from"] = f"none: the cost model gave {t:.4g} s for the unrolled model on this topology"
    row["collective_bytes_per_step"] = {op: b.get(op, 0) for op in sorted(b)}


def _layer_types(config) -> tuple[str, ...]:
  from jaxalign.loops import setup
  cfg = setup.resolve_model_config(config.model.init, config.model)
  return tuple(cfg.layer_types) if cfg.layer_types else ("layer",) * cfg.num_layers


def _program_times(config, mesh, kinds: list[str], uniform: bool) -> dict:
  """(cost-model seconds, collective bytes by op) of each program with the model cut to the given unrolled
  layers (`uniform`: by count, the model's own layer kind)."""
  c = config.copy_and_resolve_references()
  with c.unlocked():  # Read by setup.resolve_model_config; plans only.
    if uniform:
      c.model.plan_layers = len(kinds)
    else:
      c.model.plan_layer_types = ",".join(kinds)
  parts = stages.module(c).build(c, "", mesh=mesh, abstract=True)
  out = {}
  for name, (fn, args) in parts.programs.items():
    try:
      with jax.set_mesh(mesh), moe.pricing():  # MoE expert matmuls as moe.pricing says.
        compiled = fn.lower(*args).compile()
    except Exception:  # Even one or two layers do not fit: no time estimate.
      continue
    cost = _cost(compiled)
    if cost.get("optimal_seconds"):
      out[name] = (float(cost["optimal_seconds"]), collective_bytes(compiled.as_text() or ""))
  return out


def _cost(compiled) -> dict:
  """XLA's cost analysis as one dict (older jax returns a list of one)."""
  cost = compiled.cost_analysis()
  return cost[0] if isinstance(cost, (list, tuple)) and cost else (cost or {})


def _num_layers(config) -> int:
  from jaxalign.loops import setup
  return setup.resolve_model_config(config.model.init, config.model).num_layers


def _model_flops(config, program: str, layers: int) -> float:
  """Model FLOPs of one train step, the usual MFU convention: 6 x the matmul params a token uses (the input
  embedding is a lookup, not a matmul; the reward stage runs no LM head; an MoE token uses its k experts, not
  all) plus attention: 12 H N per token per layer per attended key, a causal layer attending T / 2 keys
  on average and a sliding layer of window W fewer (the usual 6 L T H N when no layer slides); 0 for programs
  that do not train (sampling)."""
  from jaxalign.loops import setup
  if program not in ("train_step",):
    return 0.0
  cfg = setup.resolve_model_config(config.model.init, config.model)
  rows = config.train.batch_size * (2 if config.stage in ("reward", "dpo") else 1)
  t = config.train.seq_len
  vd = cfg.vocab_size * cfg.hidden_size
  matmul = cfg.num_params() - (0 if cfg.tie_embeddings else vd) - (vd if config.stage == "reward" else 0)
  if cfg.num_experts:  # Experts a token does not visit.
    matmul -= cfg.num_layers * (cfg.num_experts - cfg.experts_per_token) * 3 * cfg.hidden_size * cfg.expert_size
  keys = sum(_mean_keys(t, w) for w in cfg.window_sizes())
  return float(rows * t * (6 * matmul + 12 * cfg.num_heads * cfg.head_dim * keys))


def _mean_keys(t: int, window: int) -> float:
  """Keys a query attends on average over a causal row of t tokens (window 0: unlimited)."""
  if not window or window >= t:
    return t / 2
  return window - window * (window - 1) / (2 * t)


def collective_counts(hlo: str) -> dict:
  """How many of each collective op the compiled HLO runs (async starts counted once)."""
  counts = collections.Counter()
  hlo = _uncomment(hlo)
  for op in COLLECTIVES:
    counts[op] = len(re.findall(rf"= [^=]*?\b{op}(?:-start)?\(", hlo))
  return {k: v for k, v in counts.items() if v}


def _uncomment(hlo: str) -> str:
  """The HLO without XLA's `/*index=N*/` markers: it writes one every fifth element of a long tuple, and their
  '=' would end the match of a combined collective's result shape (six or more arrays reduced at once went
  uncounted)."""
  return re.sub(r"/\*index=\d+\*/", "", hlo)


def collective_bytes(hlo: str) -> dict:
  """Result bytes per device of each collective op in the HLO, summed (a while-loop body counted once)."""
  return {op: sum(r["bytes"] for r in largest(hlo, op, n=None)) for op in COLLECTIVES}


def largest(hlo: str, op: str, n: int | None = 3) -> list[dict]:
  """The `n` largest results of `op` in the HLO (all if n is None), by bytes per device. A combined op
  (a tuple result) counts all its arrays; an async `-start` tuple (operands, results) its largest array."""
  found = []
  hlo = _uncomment(hlo)
  for m in re.finditer(rf"= (\([^=]*?\)|[a-z0-9]+\[[0-9,]*\]\S*) \b{op}(-start)?\(", hlo):
    arrays = [(dt, [int(x) for x in dims.split(",") if x])
              for dt, dims in re.findall(r"([a-z][a-z0-9]*)\[([0-9,]*)\]", m.group(1))]
    sizes = [int(np.prod(d or [1])) * _DTYPE_BYTES.get(dt, 4) for dt, d in arrays]
    if not sizes:
      continue
    if m.group(2):
      i = int(np.argmax(sizes))
      arrays, sizes = [arrays[i]], [sizes[i]]
    found.append({"shape": arrays[0][1] if len(arrays) == 1 else [a[1] for a in arrays],
                  "dtype": arrays[0][0], "bytes": int(sum(sizes))})
  return sorted(found, key=lambda r: -r["bytes"])[:n] if n else found


def pallas_kernels(hlo: str) -> dict:
  """Pallas TPU kernels in the compiled HLO by the function that made them ({'gmm': 6, 'tgmm': 3, ...}:
  megablox's grouped matmuls; splash attention's forward and backward kernels by their own names)."""
  out = collections.Counter()
  for line in hlo.splitlines():
    if "tpu_custom_call" in line and "custom_call_target" in line:
      m = re.search(r'op_name="[^"]*?([A-Za-z_0-9]+)\)?/pallas_call', line)
      name = m.group(1) if m else re.match(r"\s*(?:ROOT )?%([A-Za-z_]+?)(?:\.\d+)* = ", line)
      out[name if isinstance(name, str) else (name.group(1) if name else "unnamed")] += 1
  return dict(sorted(out.items()))


def attention_kind(hlo: str) -> str:
  if "splash" in hlo or "tpu_custom_call" in hlo:
    return "pallas (tpu_custom_call)"
  if "cudnn" in hlo.lower() and "fmha" in hlo.lower():
    return "cudnn fused attention"
  return "XLA dots and softmax"


def advice(config, row: dict, hbm: float) -> str:
  """Which knob to turn first when a program does not fit in `hbm` bytes per device."""
  over = row["peak_bytes"] / hbm
  knobs = []
  if config.model.remat == "none":
    knobs.append("model.remat=full (recompute activations in the backward pass)")
  if config.mesh.data > 1:
    knobs.append("more of the mesh on fsdp (mesh.data=1 mesh.fsdp=-1): params and optimizer state shard further")
  if "grad_accum" in config.train and config.train.grad_accum == 1 and config.train.batch_size > 1:
    knobs.append("train.grad_accum=2 or more (fewer rows in flight per device)")
  if config.get("stage", "") == "sft" and config.model.get("fused_head", True):
    knobs.append("model.fused_head=False (the tiled LM head: no [D, V] gradient buffer, one more head matmul)")
  for group in ("ppo", "grpo"):
    if group in config and config[group].minibatches == 1:
      knobs.append(f"{group}.minibatches=2 or more (fewer rows per update pass)")
  knobs.append("a shorter train.seq_len, or a larger slice")
  return f"needs {over:.1f}x the {hbm / 2**30:.0f} GiB of HBM per device: try " + "; ".join(knobs)


def per_device_bytes(leaves) -> int:
  """Bytes one device holds of abstract sharded leaves (the largest shard of each)."""
  total = 0
  for x in leaves:
    s = getattr(x, "sharding", None)
    shape = s.shard_shape(x.shape) if s is not None else x.shape
    total += int(np.prod(shape)) * np.dtype(x.dtype).itemsize
  return total


def summary(out: dict) -> str:
  """The plan as a few lines for the console."""
  gib = lambda v: f"{v / 2**30:.2f} GiB" if v >= 2**30 else f"{v / 2**20:.2f} MiB"  # noqa: E731
  lines = [f"plan: stage {out['stage']} on {out['topology']} ({out['devices']} devices), mesh {out['mesh']}",
           f"  params {gib(out['params_bytes_per_device'])}, optimizer {gib(out['opt_state_bytes_per_device'])}, "
           f"frozen models {gib(out['frozen_bytes_per_device'])} per device"]
  for name, row in out["programs"].items():
    if "peak_bytes" not in row:
      continue
    line = (f"  {name}: peak {'>= ' if 'compile_error' in row else ''}{gib(row['peak_bytes'])} per device "
            f"(arguments {gib(row['argument_bytes'])}, XLA temporaries {gib(row['temp_bytes'])}"
            + (f"; the peak is XLA's own, arguments + temporaries {gib(row['sum_bytes'])})" if "sum_bytes" in row
               else ")"))
    if "fits" in row:
      line += f", {100 * row['hbm_fraction']:.0f}% of HBM: " + ("fits" if row["fits"] else "DOES NOT FIT")
    if row.get("step_seconds"):
      line += f"; step {row['step_seconds']:.3g} s"
    if row.get("mfu"):
      line += f", MFU {100 * row['mfu']:.0f}%"
    if row.get("collective_bytes_per_step"):
      line += f"; collectives {gib(sum(row['collective_bytes_per_step'].values()))} per device per step"
    lines.append(line)
    if row.get("advice"):
      lines.append(f"    {row['advice']}")
    if row.get("warning"):
      lines.append(f"    warning: {row['warning']}")
  return "\n".join(lines)
