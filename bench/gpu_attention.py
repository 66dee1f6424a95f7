"""cuDNN attention on a GPU against the fused XLA path: a small Llama's logits and gradients (padding, two packed
documents, sliding window) and one layer-stack's SFT gradient time.

  python3 bench/gpu_attention.py     # on a machine with a GPU (jax with CUDA)
"""

from __future__ import annotations

import json
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, __file__.rsplit("/", 2)[0])
from jaxalign.models import transformer as T  # noqa: E402
from jaxalign.models.config import ModelConfig  # noqa: E402


def case(window=None):
  cfg = ModelConfig(vocab_size=32000, hidden_size=1024, intermediate_size=2816, num_layers=4, num_heads=16,
                    num_kv_heads=4, head_dim=64, dtype="bfloat16", sliding_window=window)
  params = T.init_params(cfg, jax.random.key(0))
  rng = np.random.default_rng(0)
  b, t = 4, 1024
  tok = jnp.asarray(rng.integers(0, cfg.vocab_size, (b, t)))
  seg = np.ones((b, t), np.int32)
  seg[1, 700:] = 0          # right padding
  seg[2, 400:] = 2          # two packed documents
  pos = np.where(seg[2:3] == 2, np.arange(t) - 400, np.arange(t))
  positions = jnp.asarray(np.concatenate([np.arange(t)[None]] * 2 + [pos] + [np.arange(t)[None]]))
  seg = jnp.asarray(seg)
  out = {}
  for impl in ("fused", "cudnn"):
    c = cfg.replace(attention=impl)

    def loss(p):
      logits, _ = T.forward(c, p, tok, positions, seg)
      return jnp.sum(jnp.sin(logits.astype(jnp.float32)) * (seg > 0)[..., None]) / 1e4, logits

    f = jax.jit(jax.value_and_grad(loss, has_aux=True))
    hlo = f.lower(params).compile().as_text()
    (v, logits), g = f(params)
    jax.block_until_ready(g)
    times = []
    for _ in range(5):
      s = time.perf_counter()
      jax.block_until_ready(f(params))
      times.append(time.perf_counter() - s)
    out[impl] = (logits, g, 1e3 * float(np.median(times)), "cudnn" in hlo.lower() and "fmha" in hlo.lower())
  lf, gf = out["fused"][0], out["fused"][1]
  lc, gc = out["cudnn"][0], out["cudnn"][1]
  m = np.asarray(seg > 0)[..., None]
  gerr = max(float(jnp.max(jnp.abs(a.astype(jnp.float32) - b.astype(jnp.float32))) / (float(jnp.max(jnp.abs(a.astype(jnp.float32)))) + 1e-12))
             for a, b in zip(jax.tree.leaves(gc), jax.tree.leaves(gf)))
  return {"window": window, "logits_max_abs_diff": float(np.max(np.abs(np.asarray(lc - lf, np.float32) * m))),
          "logits_max_abs": float(np.max(np.abs(np.asarray(lf, np.float32) * m))),
          "grad_max_rel_diff": gerr, "fused_ms": out["fused"][2], "cudnn_ms": out["cudnn"][2],
          "cudnn_in_hlo": out["cudnn"][3], "cudnn_in_fused_hlo": out["fused"][3]}


if __name__ == "__main__":
  res = {"devices": [str(d) for d in jax.devices()], "cases": [case(None), case(256)]}
  print(json.dumps(res, indent=1))
  if len(sys.argv) > 1:
    with open(sys.argv[1], "w") as f:
      json.dump(res, f, indent=1)
