"""Device mesh from config and the one table that maps logical axis names to mesh axes.

Mesh axes: `data` (pure data parallel), `expert` (Mixture-of-Experts expert parallelism: experts split over it,
and outside the MoE layers a further data axis), `fsdp` (data parallel with sharded params and optimizer
state), `tensor` (Megatron-style model parallel over heads, MLP width and vocab). Batches shard over
(data, expert, fsdp).

Activations are named as explicitly as params (`act_*` rows of the same table) and constrained inside the
model with `constrain`, which reads the mesh that `jax.set_mesh` put in context (a no-op without one, so a
step traced without a mesh is unchanged). Why: with params sharded over their embed dim and nothing said about
activations, XLA's propagation partitions each matmul over its contracting dim and every chip holds
global-batch-shaped activations and logits (an 8B SFT step at 4k on v5p-64: 190 GiB of temporaries per chip).
"""

from __future__ import annotations

import logging
import math
from typing import Any, Sequence

import jax
import jax.numpy as jnp
from jax.experimental import mesh_utils
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

MESH_AXES = ("data", "expert", "fsdp", "tensor")
BATCH = ("data", "expert", "fsdp")

# Logical axis -> mesh axes. A dimension not divisible by its mesh axes is replicated (logged once).
RULES: dict[str, Any] = {
    "batch": BATCH,
    "length": None,
    "vocab": "tensor",
    "embed": "fsdp",
    "heads": "tensor",
    "kv_heads": "tensor",
    "head_dim": None,
    "mlp": "tensor",
    "norm": None,
    "layers": None,
    "lora_rank": None,
    "expert": "expert",
    "scalar": None,
    # Activations: batch over the data axes, heads / MLP width / vocab over tensor, the residual stream whole
    # per row (Megatron: its matmuls all-gather the fsdp-sharded weights, not the activations).
    "act_batch": BATCH,
    "act_length": None,
    "act_embed": None,
    "act_heads": "tensor",
    "act_kv_heads": "tensor",
    "act_mlp": "tensor",
    "act_vocab": "tensor",
}


def make_mesh(data: int = 1, fsdp: int = -1, tensor: int = 1, devices: Sequence[jax.Device] | None = None,
              expert: int = 1) -> Mesh:
  """Mesh with axes (data, expert, fsdp, tensor); one size may be -1 for 'the remaining devices'."""
  devices = list(devices if devices is not None else jax.devices())
  sizes = {"data": int(data), "expert": int(expert), "fsdp": int(fsdp), "tensor": int(tensor)}
  free = [k for k, v in sizes.items() if v == -1]
  if len(free) > 1:
    raise ValueError(f"mesh: only one of mesh.data/expert/fsdp/tensor may be -1, got {sizes}")
  known = math.prod(v for v in sizes.values() if v != -1)
  if any(v == 0 or v < -1 for v in sizes.values()):
    raise ValueError(f"mesh: sizes must be positive or -1, got {sizes}")
  if free:
    if len(devices) % known:
      raise ValueError(f"mesh: {len(devices)} devices are not divisible by the fixed axes {sizes} (product {known})")
    sizes[free[0]] = len(devices) // known
  total = math.prod(sizes.values())
  if total != len(devices):
    raise ValueError(f"mesh: mesh.data x mesh.expert x mesh.fsdp x mesh.tensor = {sizes['data']} x "
                     f"{sizes['expert']} x {sizes['fsdp']} x {sizes['tensor']} = {total} does not match the "
                     f"{len(devices)} available devices")
  shape = tuple(sizes[a] for a in MESH_AXES)
  try:
    dev = mesh_utils.create_device_mesh(shape, devices=devices)
  except Exception:  # Non-TPU topologies or odd device lists: plain row-major order.
    dev = np.asarray(devices).reshape(shape)
  return Mesh(dev, MESH_AXES)


def mesh_from_config(mesh_cfg) -> Mesh:
  return make_mesh(mesh_cfg.data, mesh_cfg.fsdp, mesh_cfg.tensor, expert=mesh_cfg.get("expert", 1))


def spec_for(axes: Sequence[str | None], shape: Sequence[int], mesh: Mesh, rules=None, name: str = "?") -> P:
  """PartitionSpec for one array from its logical axis names."""
  rules = RULES if rules is None else rules
  if len(axes) != len(shape):
    raise ValueError(f"param {name}: {len(axes)} logical axes {tuple(axes)} for shape {tuple(shape)}")
  out, used = [], set()
  for ax, dim in zip(axes, shape):
    if ax is None:
      out.append(None)
      continue
    if ax not in rules:
      raise KeyError(f"param {name}: logical axis {ax!r} matches no sharding rule (known: {sorted(rules)})")
    mesh_axes = rules[ax]
    if mesh_axes is None:
      out.append(None)
      continue
    mesh_axes = (mesh_axes,) if isinstance(mesh_axes, str) else tuple(mesh_axes)
    mesh_axes = tuple(a for a in mesh_axes if a not in used and mesh.shape[a] > 1)
    size = math.prod(mesh.shape[a] for a in mesh_axes)
    if not mesh_axes or dim % size:
      if mesh_axes:
        logging.info("param %s: dim %s (%s) not divisible by mesh %s; replicated", name, dim, ax, mesh_axes)
      out.append(None)
      continue
    used.update(mesh_axes)
    out.append(mesh_axes[0] if len(mesh_axes) == 1 else mesh_axes)
  return P(*out)


# Activation shapes whose batch dimension the data axes did not divide, recorded while tracing (the compile
# plan reports them: every device then holds and computes all of those rows).
UNSHARDED_BATCHES: set[tuple[int, ...]] = set()


def constrain(x: jax.Array, axes: Sequence[str | None]) -> jax.Array:
  """`x` constrained to the logical `axes` under the mesh in context (`jax.set_mesh`); unchanged without one.

  A dimension its mesh axes do not divide stays unsharded (as for params), so odd batch sizes still trace;
  for the batch dimension that is recorded in UNSHARDED_BATCHES."""
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty or mesh.size == 1:
    return x
  spec = spec_for(axes, x.shape, mesh, name="activation")
  if "act_batch" in axes:
    i = list(axes).index("act_batch")
    if spec[i] is None and x.shape[i] > 1 and math.prod(mesh.shape[a] for a in BATCH) > 1:
      UNSHARDED_BATCHES.add(tuple(x.shape))
  return jax.lax.with_sharding_constraint(x, spec)


def platform() -> str:
  """The platform the program being traced is for: the mesh in context's (a TPU topology in a compile plan
  made on a CPU machine), else the default backend."""
  mesh = jax.sharding.get_abstract_mesh()
  return mesh.abstract_device.platform if not mesh.empty else jax.default_backend()


def path_name(path) -> str:
  """A tree path as 'layers/wq' (the name rules, freeze patterns and errors use)."""
  return "/".join(str(getattr(k, "key", getattr(k, "idx", k))) for k in path)


def tree_shardings(shapes, axes, mesh: Mesh, rules=None):
  """NamedShardings for a params-like tree, given a matching tree of logical axis tuples."""
  is_axes = lambda x: isinstance(x, tuple) and all(isinstance(a, (str, type(None))) for a in x)  # noqa: E731
  flat_axes, _ = jax.tree_util.tree_flatten_with_path(axes, is_leaf=is_axes)
  flat_shapes, treedef = jax.tree_util.tree_flatten(shapes)
  if len(flat_axes) != len(flat_shapes):
    raise ValueError(f"axes tree has {len(flat_axes)} leaves, shapes tree {len(flat_shapes)}")
  out = [NamedSharding(mesh, spec_for(ax, s.shape, mesh, rules, path_name(path)))
         for (path, ax), s in zip(flat_axes, flat_shapes)]
  return jax.tree_util.tree_unflatten(treedef, out)


def batch_sharding(mesh: Mesh, ndim: int | None = None) -> NamedSharding:
  """Leading dim over (data, expert, fsdp), the rest replicated (valid for any rank >= 1)."""
  del ndim
  return NamedSharding(mesh, P(BATCH))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def data_parallel_size(mesh: Mesh) -> int:
  return mesh.shape["data"] * mesh.shape["fsdp"] * dict(mesh.shape).get("expert", 1)


def describe(mesh: Mesh) -> str:
  return (f"mesh {dict(mesh.shape)} over {mesh.devices.size} {jax.devices()[0].platform} devices, "
          f"{jax.process_count()} process(es)")



def after(tree, dep):
  """`tree` (arrays with a leading batch axis), made to wait for `dep` (a scalar, or the same batch axis).

  Why: XLA:CPU runs independent parts of a program concurrently, so two independent layer scans that both
  hold collectives (a policy and a frozen reference forward) can enter them in a different order on
  different devices; across processes (gloo) that is a collective mismatch and an abort. An optimization
  barrier does not survive to XLA:CPU's runtime, so this adds a real data dependency, row by row (no
  collective): `(d != d) & (d == d)` is always false, which XLA cannot fold (NaN semantics). Costs one
  elementwise op on the batch.
  """
  if dep is None:
    return tree
  d = jax.tree.leaves(dep)[0]
  d = d.reshape(d.shape[0], -1).sum(-1) if d.ndim else d
  none = jnp.logical_and(d != d, d == d)

  def tie(x):
    z = none.reshape((-1,) + (1,) * (x.ndim - 1)) if none.ndim else none
    return jnp.logical_or(x, z) if x.dtype == jnp.bool_ else x + z.astype(x.dtype)

  return jax.tree.map(tie, tree)
