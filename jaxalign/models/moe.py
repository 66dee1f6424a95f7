"""Mixture-of-Experts MLP (Qwen3-MoE, Mixtral): top-k routing, dropless grouped matmuls, expert parallelism,
and the router's load-balancing loss as transformers computes it.

No [tokens, experts, hidden] tensor is ever built: each token's k (token, expert) pairs are sorted by expert
and the experts run as one grouped matmul over the sorted rows (`grouped_matmul`): the Pallas megablox
kernel on TPU, `jax.lax.ragged_dot` on GPU, and on CPU a scan over (row tile, expert) work items
(`jax.lax.ragged_dot` off TPU/GPU lowers to a dense masked [experts, rows, ...] product: E times the work).

Expert parallelism: expert weights are sharded over the `expert` mesh axis, and so is the token batch. In
the MoE layer each device gathers the tokens of its expert group, runs the experts it holds on the pairs
routed to them, and a reduce-scatter returns each device its own tokens' outputs (`moe_mlp`).
"""

from __future__ import annotations

import contextlib

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from jaxalign import sharding

IMPLS = ("auto", "tiled", "ragged", "megablox")


def route(cfg, x_ND, router_DE):
  """(router logits [N, E] float32, top-k weights [N, k] float32, top-k expert ids [N, k]) as the HF routers:
  softmax in float32, top-k of the probabilities, renormalised over the k when `cfg.norm_topk` (Mixtral
  always; Qwen3-MoE's norm_topk_prob)."""
  logits_NE = jnp.dot(x_ND, router_DE.astype(x_ND.dtype), preferred_element_type=jnp.float32)
  probs_NE = jax.nn.softmax(logits_NE, axis=-1)
  _, top_i = jax.lax.top_k(jax.lax.stop_gradient(probs_NE), cfg.experts_per_token)
  # The chosen probabilities by a one-hot product, not top_k's own values: top_k's gradient is a scalar
  # scatter, which serialises on TPU (and which XLA's TPU cost model cannot price).
  top_w = jnp.einsum("ne,nke->nk", probs_NE, jax.nn.one_hot(top_i, cfg.num_experts, dtype=probs_NE.dtype))
  if cfg.norm_topk:
    top_w = top_w / jnp.sum(top_w, axis=-1, keepdims=True)
  return logits_NE, top_w, top_i


def aux_stats(cfg, logits_NE, top_i, mask_N):
  """Per-layer sums for the load-balancing loss: (tokens routed to each expert [E], router probability mass
  per expert [E], real tokens []), padding excluded. Summed over layers, `aux_loss` turns them into the loss."""
  e = cfg.num_experts
  m = mask_N.astype(jnp.float32)
  keys = jnp.where(jnp.repeat(mask_N, top_i.shape[-1]), top_i.reshape(-1), e)  # Padding counts nowhere.
  counts = histogram(jnp.sort(keys), e).astype(jnp.float32)
  probs = jnp.sum(jax.nn.softmax(logits_NE, axis=-1) * m[:, None], axis=0)
  return counts, probs, jnp.sum(m)


def aux_loss(cfg, counts_E, probs_E, rows):
  """transformers' `load_balancing_loss_func` (Switch Transformer eq. 4-6, accumulated over layers):
  E * sum_e (routed fraction of e) * (mean router probability of e), both over all layers' real tokens."""
  rows = jnp.maximum(rows, 1.0)
  return cfg.num_experts * jnp.sum((counts_E / rows) * (probs_E / rows))


def histogram(sorted_keys, length: int):
  """Occurrences of 0 .. length - 1 in sorted int keys (others ignored), by binary search rather than a
  scatter-add of ones: on TPU a scalar scatter with colliding indices serialises (and XLA's TPU cost model
  cannot price it: it returns a negative step time for any program holding one)."""
  edges = jnp.searchsorted(sorted_keys, jnp.arange(length + 1, dtype=sorted_keys.dtype), side="left")
  return jnp.diff(edges).astype(jnp.int32)


def grouped_matmul(x_MD, w_GDF, group_sizes_G, impl: str = "auto"):
  """Rows [M, D] sorted by group times their group's weight [G, D, F] -> [M, F]; rows past the groups' total
  are zero. `impl`: 'megablox' (Pallas TPU kernel; interpret mode off TPU), 'ragged' (lax.ragged_dot),
  'tiled' (scan over row tiles x groups), 'auto' by platform. Megablox's TPU blocks must be multiples of 128
  in D and F (every released MoE's are); other widths (tiny test models) take ragged_dot on TPU too."""
  if impl == "auto":
    impl = {"tpu": "megablox", "gpu": "ragged", "cuda": "ragged", "rocm": "ragged"}.get(sharding.platform(), "tiled")
    if impl == "megablox" and (x_MD.shape[1] % 128 or w_GDF.shape[-1] % 128):
      impl = "ragged"
  m = x_MD.shape[0]
  total = jnp.sum(group_sizes_G)
  valid = (jnp.arange(m) < total)[:, None]
  # Rows past the groups' total are left unwritten by megablox, forward (its output) and backward (the
  # input's gradient): `where` on both sides keeps their garbage out of values and gradients.
  x_MD = jnp.where(valid, x_MD, jnp.zeros((), x_MD.dtype))
  if _PRICING:  # The compile plan's cost-model compiles only: not the grouped product (see `pricing`).
    y = _balanced(x_MD, w_GDF)
  elif impl == "ragged":
    y = jax.lax.ragged_dot(x_MD, w_GDF, group_sizes_G.astype(jnp.int32))
  elif impl == "megablox":
    y = _megablox(x_MD, w_GDF, group_sizes_G)
  elif impl == "tiled":
    y = _tiled(x_MD, w_GDF, group_sizes_G)
  else:
    raise ValueError(f"grouped_matmul impl={impl!r}: expected one of {IMPLS}")
  return jnp.where(valid, y, jnp.zeros((), y.dtype))


_PRICING: list = []


@contextlib.contextmanager
def pricing():
  """Inside: grouped matmuls trace as a balanced batched matmul (the rows split evenly over the groups), for
  XLA's TPU cost model only. It cannot price megablox (it sees no Pallas kernel's work, and the kernel's
  group-metadata scatter makes it return a negative time) and ragged_dot lowers on TPU without megablox to a
  product over every group (E times the work). The balanced stand-in has the ideal kernel's FLOPs and reads
  every expert's weights once: what megablox does when routing is balanced (each device's experts then get
  their share of the pairs, which is all `_experts_local` passes on while pricing). Never for values."""
  _PRICING.append(True)
  try:
    yield
  finally:
    _PRICING.pop()


def _balanced(x_MD, w_GDF):
  m, d = x_MD.shape
  g = w_GDF.shape[0]
  mp = _round_up(m, g)
  x = jnp.pad(x_MD, ((0, mp - m), (0, 0))).reshape(g, mp // g, d)
  return jnp.einsum("gmd,gdf->gmf", x, w_GDF).reshape(mp, -1)[:m]


def _megablox(x_MD, w_GDF, group_sizes_G):
  from jax.experimental.pallas.ops.tpu.megablox import ops as megablox
  m, d = x_MD.shape
  f = w_GDF.shape[-1]
  tm = min(128, _round_up(m, 8))
  pad = _round_up(m, tm) - m
  x = jnp.pad(x_MD, ((0, pad), (0, 0))) if pad else x_MD
  y = megablox.gmm(x, w_GDF, group_sizes_G.astype(jnp.int32), x_MD.dtype, (tm, min(128, d), min(128, f)),
                   None, None, False, sharding.platform() != "tpu")
  return y[:m]


def _round_up(n: int, k: int) -> int:
  return -(-n // k) * k


def _tiled(x_MD, w_GDF, group_sizes_G, tile: int = 64):
  """Grouped matmul as a scan over work items (row tile, group): one [tile, D] x [D, F] product per tile and
  per group that overlaps it (at most M / tile + G - 1 items), rows outside the group masked. Exact; FLOPs
  within (1 + G * tile / M) of the ragged ideal; no buffer bigger than the output."""
  m, d = x_MD.shape
  g, _, f = w_GDF.shape
  tile = min(tile, _round_up(m, 8))
  mp = _round_up(m, tile)
  x = jnp.pad(x_MD, ((0, mp - m), (0, 0)))
  sizes = group_sizes_G.astype(jnp.int32)
  ends = jnp.cumsum(sizes)
  starts = ends - sizes
  first = starts // tile
  n_tiles = jnp.where(sizes > 0, (ends - 1) // tile - first + 1, 0)
  item_end = jnp.cumsum(n_tiles)
  items = mp // tile + g - 1
  idx = jnp.arange(items)
  grp = jnp.minimum(jnp.searchsorted(item_end, idx, side="right"), g - 1)
  live = idx < item_end[-1]
  tile_of = jnp.where(live, first[grp] + idx - (item_end[grp] - n_tiles[grp]), 0)

  def body(out, it):
    t, gi, ok = it
    rows = t * tile + jnp.arange(tile)
    keep = ok & (rows >= starts[gi]) & (rows < ends[gi])
    xt = jax.lax.dynamic_slice_in_dim(x, t * tile, tile)
    yt = jnp.dot(xt, w_GDF[gi], preferred_element_type=jnp.float32)
    yt = jnp.where(keep[:, None], yt, 0.0)
    cur = jax.lax.dynamic_slice_in_dim(out, t * tile, tile)
    return jax.lax.dynamic_update_slice_in_dim(out, cur + yt, t * tile, 0), None

  out, _ = jax.lax.scan(body, jnp.zeros((mp, f), jnp.float32), (tile_of, grp, live))
  return out[:m].astype(x_MD.dtype)


def _experts_local(cfg, act, x_ND, top_w, top_i, w_gate, w_up, w_down, first_expert, impl):
  """Outputs [N, D] of the experts held here (ids first_expert .. + w_gate.shape[0]) for these tokens' pairs
  routed to them (other pairs contribute zero: another device holds their expert)."""
  n, k = top_i.shape
  local_e = w_gate.shape[0]
  e_local = top_i.reshape(-1) - first_expert
  here = (e_local >= 0) & (e_local < local_e)
  key = jnp.where(here, e_local, local_e)
  order = jnp.argsort(key, stable=True)
  rows = order // k
  sizes = histogram(key[order], local_e)
  xs = x_ND[rows]
  if _PRICING:  # Balanced routing: this device's experts get local_e / E of the pairs (the rest sort last).
    xs = xs[:_round_up(-(-n * k * local_e // cfg.num_experts), local_e)]
  h = act(grouped_matmul(xs, w_gate, sizes, impl)) * grouped_matmul(xs, w_up, sizes, impl)
  y = grouped_matmul(h, w_down, sizes, impl)
  if _PRICING:
    y = jnp.pad(y, ((0, n * k - y.shape[0]), (0, 0)))
  # Back to (token, k) order by the inverse permutation (a gather: no scatter-add forward, and the weights
  # are applied in token order, so their gradient is no scalar scatter either).
  y_NKD = y[jnp.argsort(order)].reshape(n, k, -1)
  wt = jnp.where(here.reshape(n, k), top_w, 0.0).astype(y.dtype)
  return jnp.einsum("nkd,nk->nd", y_NKD, wt)


def moe_mlp(cfg, act, x_BTD, router_DE, w_gate, w_up, w_down, mask_BT, impl: str = "auto"):
  """The MoE MLP of one layer: (output [B, T, D], aux stats (counts [E], probs [E], rows)).

  Under a mesh it runs per device (shard_map): tokens stay where their batch shard is (the expert axis
  shards the batch too), weights arrive whole over fsdp (gathered, as FSDP does) and split over `expert`
  and over `tensor` (the expert MLP width, psum'd after the down projection)."""
  b, t, d = x_BTD.shape
  logits, top_w, top_i = route(cfg, x_BTD.reshape(b * t, d), router_DE)
  stats = aux_stats(cfg, logits, top_i, mask_BT.reshape(-1) > 0)
  top_w = top_w.reshape(b, t, -1)
  top_i = top_i.reshape(b, t, -1)
  mesh = jax.sharding.get_abstract_mesh()

  def local(x, tw, ti, wg, wu, wd, ep_axis, gather):
    bl = x.shape[0]
    first = 0
    if ep_axis:
      first = jax.lax.axis_index(ep_axis) * wg.shape[0]
      if gather:  # The expert group's tokens, so each device serves every pair routed to its experts.
        x, tw, ti = (jax.lax.all_gather(a, ep_axis, axis=0, tiled=True) for a in (x, tw, ti))
    n = x.shape[0] * x.shape[1]
    y = _experts_local(cfg, act, x.reshape(n, d), tw.reshape(n, -1), ti.reshape(n, -1), wg, wu, wd, first, impl)
    y = y.reshape(x.shape)
    if tensor_axis:
      y = jax.lax.psum(y, tensor_axis)
    if ep_axis and gather:
      y = jax.lax.psum_scatter(y, ep_axis, scatter_dimension=0, tiled=True)
    elif ep_axis:
      y = jax.lax.psum(y, ep_axis)
    return y[:bl]

  if mesh.empty or mesh.size == 1:
    tensor_axis = None
    return local(x_BTD, top_w, top_i, w_gate, w_up, w_down, None, False), stats
  x_spec = sharding.spec_for(("act_batch", None, None), x_BTD.shape, mesh)
  w_spec = sharding.spec_for(("expert", None, "mlp"), w_gate.shape, mesh)
  wd_spec = P(w_spec[0], w_spec[2], None)
  ep_axis, tensor_axis = w_spec[0], w_spec[2]
  batch_axes = x_spec[0] if isinstance(x_spec[0], tuple) else (x_spec[0],)
  gather = ep_axis is not None and ep_axis in batch_axes
  fn = jax.shard_map(lambda *a: local(*a, ep_axis, gather), mesh=mesh,
                     in_specs=(x_spec, x_spec, x_spec, w_spec, w_spec, wd_spec), out_specs=x_spec, check_vma=False)
  return fn(x_BTD, top_w, top_i, w_gate, w_up, w_down), stats


def check_divisible(cfg, mesh) -> None:
  """The expert axis must divide the experts (each device holds the same number of whole experts).

  A model without experts on a mesh with an expert axis is fine: the axis is one of the batch axes, so a dense
  reward or reference model beside an MoE policy simply runs data-parallel over it."""
  from jaxalign.errors import ConfigError
  ep = dict(mesh.shape).get("expert", 1)
  if cfg.num_experts and ep > 1 and cfg.num_experts % ep:
    divisors = [d for d in range(1, cfg.num_experts + 1) if cfg.num_experts % d == 0 and d <= mesh.devices.size]
    raise ConfigError(f"mesh.expert={ep} does not divide the model's {cfg.num_experts} experts "
                      f"(model.num_experts): set --config.mesh.expert to one of {divisors}")


# A forward records its layers' aux stats here while it is traced (`collect` around the forward whose router
# loss should count: the policy's, not a frozen reference's). Values stay within the trace that made them.
_COLLECTORS: list[list] = []


@contextlib.contextmanager
def collect():
  """Collects the router stats of the MoE forwards traced inside; `loss(cfg, box)` is their aux loss."""
  box: list = []
  _COLLECTORS.append(box)
  try:
    yield box
  finally:
    _COLLECTORS.pop()


def record(stats) -> None:
  if _COLLECTORS:
    _COLLECTORS[-1].append(stats)


def collected_loss(cfg, box: list):
  """The load-balancing loss of the forwards collected in `box` (0.0 for a dense model)."""
  if not box or not cfg.num_experts:
    return jnp.zeros((), jnp.float32)
  counts = sum(s[0] for s in box)
  probs = sum(s[1] for s in box)
  rows = sum(s[2] for s in box)
  return aux_loss(cfg, counts, probs, rows)


def add_router_loss(cfg, box: list, loss, weight):
  """(loss + router_aux_coef x aux x weight, {'router_aux_loss': aux x weight}) for a MoE model, else
  (loss, {}). `weight` is the loss's denominator for sum-form losses (the steps divide the sums by it), 1
  for mean-form ones: either way the trained objective is loss / weight + coef x aux, as HF adds it."""
  if not cfg.num_experts:
    return loss, {}
  aux = collected_loss(cfg, box)
  return loss + cfg.router_aux_coef * aux * weight, {"router_aux_loss": aux * weight}
