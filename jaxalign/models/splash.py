"""Attention on TPU through the Pallas splash-attention kernel that ships in jax.

Causal or sliding-window masks are static per kernel (one kernel per distinct window, picked per layer with
`lax.switch` when layers differ, as Gemma 2's alternating layers); segment ids carry packing, DPO pairs,
padding and GRPO groups; Gemma 2's logit soft-cap is the kernel's own; the query scale is applied to the
queries. Under a mesh the kernel runs per shard (`shard_map`): batch over the data axes, heads over tensor
when both query and KV heads divide it. Off TPU (tests) the same kernel runs in Pallas interpret mode, so its
numerics are checked on the CPU against the dense path (tests/models/test_splash.py).

Why splash and not XLA's softmax: it never writes [T, S] scores or probabilities to HBM and skips the fully
masked blocks of a causal or windowed mask in both passes (MaxText's attention on TPU).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as kernels
from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask as masks
from jax.sharding import NamedSharding, PartitionSpec as P

from jaxalign import sharding

BLOCKS = (512, 256, 128)  # Query/key block sizes tried in order: the largest that divides the length.


def supported(t: int) -> bool:
  """Splash needs the sequence length to be a multiple of its smallest block."""
  return t % BLOCKS[-1] == 0


class SharedPrefixMask(masks._ComputableMask):
  """One prompt of P slots followed by G responses of N slots each, in one row: every slot attends causally
  to the prompt and to the earlier slots of its own response, never to another response. A GRPO group in a
  single row: the prompt runs once, with no KV cache to copy to each response (models the rollout's
  `shared_prefix` passes on TPU; see steps.policy.grouped_hidden). Static, so the kernel skips every
  response-to-other-response block."""

  def __init__(self, prompt: int, response: int, group: int):
    self.layout = (prompt, response, group)
    t = prompt + group * response
    starts = [prompt + j * response for j in range(1, group)]

    def which(x):  # Response index of slot x (0 for the prompt and the first response): no division.
      return sum((x >= s).astype(np.int32) for s in starts) if starts else x * 0

    def mask_function(q_ids, kv_ids):
      return (q_ids >= kv_ids) & ((kv_ids < prompt) | (which(q_ids) == which(kv_ids)))

    super().__init__(shape=(t, t), mask_function=mask_function)

  def __eq__(self, other):
    return isinstance(other, SharedPrefixMask) and self.layout == other.layout

  def __hash__(self):
    return hash((type(self), self.layout))


@functools.lru_cache(maxsize=32)
def _kernel(t: int, heads: int, window: int, softcap: float | None, head_shards: int, interpret: bool,
            layout: tuple[int, int, int] | None = None):
  block = next(b for b in BLOCKS if t % b == 0)
  if layout:
    mask = SharedPrefixMask(*layout)
  elif window:
    mask = masks.LocalMask((t, t), window_size=(window - 1, 0), offset=0)
  else:
    mask = masks.CausalMask((t, t))
  sizes = kernels.BlockSizes(block_q=block, block_kv=block, block_kv_compute=block, block_q_dkv=block,
                             block_kv_dkv=block, block_kv_dkv_compute=block, block_q_dq=block, block_kv_dq=block)
  return kernels.make_splash_mha(masks.MultiHeadMask([mask] * heads), block_sizes=sizes, head_shards=head_shards,
                                 q_seq_shards=1, attn_logits_soft_cap=softcap, interpret=interpret)


def attention(q_BTNH, k_BTKH, v_BTKH, segment_ids_BT, *, scale: float, softcap: float | None,
              windows: tuple[int, ...], window=None, interpret: bool | None = None,
              layout: tuple[int, int, int] | None = None):
  """Causal self-attention [B, T, N, H] without a KV cache (queries and keys are the same T slots).

  `windows`: the distinct per-layer windows (0 = full); `window`: this layer's (traced, from the layer scan)
  when there are several. `layout`: (prompt, response, groups) of a SharedPrefixMask row (no windows).
  A window counts slots (the kernel's masks are static), which equals the XLA path's
  count of positions wherever positions run consecutively within a segment: every real token of a packed
  or padded row; only padding's (unused) outputs differ. `interpret`: Pallas interpret mode (default: off TPU)."""
  b, t, n, h = q_BTNH.shape
  kh = k_BTKH.shape[2]
  mesh = jax.sharding.get_abstract_mesh()
  interpret = sharding.platform() != "tpu" if interpret is None else interpret
  sharded = not mesh.empty and mesh.size > 1
  q_spec = sharding.spec_for(("act_batch", "act_heads", None, None), (b, n, t, h), mesh) if sharded else P()
  kv_spec = sharding.spec_for(("act_batch", "act_kv_heads", None, None), (b, kh, t, h), mesh) if sharded else P()
  if sharded and q_spec[1] != kv_spec[1]:  # Heads split unevenly between queries and keys: keep them whole.
    q_spec, kv_spec = P(q_spec[0], None, None, None), P(kv_spec[0], None, None, None)
  head_axis = q_spec[1] if sharded else None
  head_shards = 1 if head_axis is None else mesh.shape[head_axis]
  q = (q_BTNH * jnp.asarray(scale, q_BTNH.dtype)).transpose(0, 2, 1, 3)
  k, v = k_BTKH.transpose(0, 2, 1, 3), v_BTKH.transpose(0, 2, 1, 3)
  seg = segment_ids_BT.astype(jnp.int32)

  def one_window(w):
    kernel = _kernel(t, n, int(w), None if not softcap else float(softcap), head_shards, interpret, layout)

    def run(kernel, q, k, v, seg):
      return jax.vmap(lambda q, k, v, s: kernel(q, k, v, segment_ids=kernels.SegmentIds(s, s)))(q, k, v, seg)

    if not sharded:
      return lambda q, k, v, seg: run(kernel, q, k, v, seg)
    kernel_spec = kernel.manual_sharding_spec(NamedSharding(mesh, P(head_axis, None)))
    fn = jax.shard_map(run, mesh=mesh, in_specs=(kernel_spec, q_spec, kv_spec, kv_spec, P(q_spec[0], None)),
                       out_specs=q_spec, check_vma=False)
    return lambda q, k, v, seg: fn(kernel, q, k, v, seg)

  if len(windows) == 1:
    o = one_window(windows[0])(q, k, v, seg)
  else:
    index = sum(jnp.where(window == w, i, 0) for i, w in enumerate(windows))
    o = jax.lax.switch(index, [one_window(w) for w in windows], q, k, v, seg)
  return o.transpose(0, 2, 1, 3)
