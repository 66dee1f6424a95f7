"""The LM heads on a GPU: the fused SFT head against the tiled and the dense head, exactness and time.

  python3 bench/gpu_head.py     # on a machine with a GPU (jax with CUDA)

Exactness: loss and gradients of each head against the dense float32 head on a small case. Time: forward +
backward of the Llama-3-8B head (hidden 4,096, vocabulary 128,256) over one 4,096- and one 8,192-token row in
bfloat16 (logits accumulate in float32), jitted, median of 10 after 3 warm-ups, with XLA's memory figure.
"""

from __future__ import annotations

import json
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, __file__.rsplit("/", 2)[0])
from jaxalign.losses import lm  # noqa: E402


def heads(tiles: int):
  def dense(h, w, t, wt):
    z = jnp.einsum("btd,dv->btv", h, w, preferred_element_type=jnp.float32)
    return jnp.sum(lm.token_logprobs(z, t) * wt)

  def tiled(h, w, t, wt):
    return jnp.sum(lm.head_logprobs(h, w, t, tiles=tiles)[0] * wt)

  def fused(h, w, t, wt):
    return lm.head_weighted_logprob_sum(h, w, t, wt)

  return {"dense": dense, "tiled": tiled, "fused": fused}


def exactness() -> dict:
  k = jax.random.split(jax.random.key(0), 4)
  b, t, d, v = 2, 1024, 256, 32000
  h = jax.random.normal(k[0], (b, t, d))
  w = jax.random.normal(k[1], (d, v)) * 0.1
  tgt = jax.random.randint(k[2], (b, t), 0, v)
  wt = jax.random.uniform(k[3], (b, t))
  out = {}
  with jax.default_matmul_precision("highest"):
    ref = jax.jit(jax.value_and_grad(heads(8)["dense"], argnums=(0, 1)))(h, w, tgt, wt)
    for name, f in heads(8).items():
      got = jax.jit(jax.value_and_grad(f, argnums=(0, 1)))(h, w, tgt, wt)
      out[name] = {"loss_rel": float(abs(got[0] - ref[0]) / abs(ref[0])),
                   "dh_max_abs": float(jnp.max(jnp.abs(got[1][0] - ref[1][0]))),
                   "dw_max_abs": float(jnp.max(jnp.abs(got[1][1] - ref[1][1])))}
  return out


def timing(t: int) -> dict:
  d, v = 4096, 128256
  k = jax.random.split(jax.random.key(1), 4)
  h = (jax.random.normal(k[0], (1, t, d)) * 0.5).astype(jnp.bfloat16)
  w = (jax.random.normal(k[1], (d, v)) * 0.02).astype(jnp.bfloat16)
  tgt = jax.random.randint(k[2], (1, t), 0, v)
  wt = jnp.ones((1, t), jnp.float32)
  out = {}
  for name, f in heads(8).items():
    g = jax.jit(jax.grad(f, argnums=(0, 1)))
    compiled = g.lower(h, w, tgt, wt).compile()
    mem = compiled.memory_analysis()
    for _ in range(3):
      jax.block_until_ready(g(h, w, tgt, wt))
    times = []
    for _ in range(10):
      s = time.perf_counter()
      jax.block_until_ready(g(h, w, tgt, wt))
      times.append(time.perf_counter() - s)
    out[name] = {"median_ms": 1e3 * float(np.median(times)), "min_ms": 1e3 * min(times),
                 "temp_gib": mem.temp_size_in_bytes / 2**30 if mem else None}
  flops = 3 * 2 * t * d * v
  out["three_matmuls_tflop"] = flops / 1e12
  return out


def main() -> None:
  res = {"devices": [str(x) for x in jax.devices()], "jax": jax.__version__, "exactness": exactness()}
  print(json.dumps(res, indent=1), flush=True)
  for t in (4096, 8192):
    res[f"time_{t}"] = timing(t)
    print(json.dumps(res[f"time_{t}"], indent=1), flush=True)
  if len(sys.argv) > 1:
    with open(sys.argv[1], "w") as f:
      json.dump(res, f, indent=1)


if __name__ == "__main__":
  main()
