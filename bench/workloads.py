"""The fixed benchmark workload (issue 8) and each contender's step, one function per (contender, figure).

Each function returns {'median_s', 'min_s', 'max_s', 'compile_s', ...} for the timed calls after warm-up.
"""

from __future__ import annotations

import functools
import time

import numpy as np

VOCAB, HIDDEN, INTER, LAYERS, HEADS, KV_HEADS, THETA, EPS = 2048, 256, 688, 4, 8, 4, 10000.0, 1e-5
SEQ, BATCH, LR, LOSS_TOKENS = 256, 8, 1e-5, 128
PROMPT, NEW = 128, 128


def _stats(times, compile_s=None, **extra):
  t = np.asarray(times)
  return {"median_s": float(np.median(t)), "min_s": float(t.min()), "max_s": float(t.max()),
          "n": len(times), "compile_s": compile_s, **extra}


def _timed(step, carry, steps: int):
  """Compile (first call), 2 warm-up calls, then `steps` timed calls of `carry, loss = step(carry)`.
  Returns (compile seconds, per-step seconds, last loss)."""
  import jax
  t = time.perf_counter()
  carry, loss = step(carry)
  jax.block_until_ready(loss)
  compile_s = time.perf_counter() - t
  times = []
  for i in range(steps + 2):
    t = time.perf_counter()
    carry, loss = step(carry)
    jax.block_until_ready(loss)
    if i >= 2:
      times.append(time.perf_counter() - t)
  return compile_s, times, loss


def _batch(seq=SEQ, batch=BATCH, seed=0):
  rng = np.random.default_rng(seed)
  tokens = rng.integers(0, VOCAB, (batch, seq + 1)).astype(np.int32)
  return tokens[:, :-1], tokens[:, 1:]


def model_flops_per_token(seq=SEQ) -> float:
  """Training FLOPs per token: 6 x matmul params + attention (12 x L x T x D, causal halves it)."""
  hd = HIDDEN // HEADS
  matmul = LAYERS * (HIDDEN * hd * (HEADS + 2 * KV_HEADS) + HEADS * hd * HIDDEN + 3 * HIDDEN * INTER) + HIDDEN * VOCAB
  return 6 * matmul + 6 * LAYERS * seq * HIDDEN


# ----------------------------------------------------------------------------------------------- jaxalign

def jaxalign_cfg(**kw):
  from jaxalign.models.config import preset
  return preset("bench", **kw)


def jaxalign_sft(steps=12, seq=SEQ, batch=BATCH, **cfg_kw):
  import jax
  import jax.numpy as jnp
  from jaxalign.config import base
  from jaxalign.models import transformer
  from jaxalign.optim import make_optimizer
  from jaxalign.steps import sft
  from jaxalign.steps.state import create

  cfg = jaxalign_cfg(**cfg_kw)
  params = {"model": transformer.init_params(cfg, jax.random.key(0))}
  ocfg = base("sft").optimizer
  with ocfg.unlocked():
    ocfg.learning_rate, ocfg.schedule, ocfg.clip_norm, ocfg.weight_decay = LR, "constant", 0.0, 0.0
  tx, _ = make_optimizer(ocfg, params, 100)
  state = create(params, tx, 0)
  inp, tgt = _batch(seq, batch)
  w = np.zeros((batch, seq), np.float32)
  w[:, -LOSS_TOKENS:] = 1.0
  b = {"tokens": jnp.asarray(inp), "targets": jnp.asarray(tgt), "weights": jnp.asarray(w),
       "positions": jnp.broadcast_to(jnp.arange(seq, dtype=jnp.int32), (batch, seq)),
       "segment_ids": jnp.ones((batch, seq), jnp.int32)}
  step = jax.jit(functools.partial(sft.sft_step, model_cfg=cfg, tx=tx), donate_argnums=0)
  compile_s, times, loss = _timed(lambda st: (lambda o: (o[0], o[1]["loss"]))(step(st, b)), state, steps)
  return _stats(times, compile_s, tokens_per_step=seq * batch, loss=float(loss))


def jaxalign_pairs(kind="dpo", steps=10):
  """Reward-model or DPO step on B pairs of (prompt 128 + response 128)."""
  import jax
  import jax.numpy as jnp
  from jaxalign.config import base
  from jaxalign.models import heads, transformer
  from jaxalign.optim import make_optimizer
  from jaxalign.steps import dpo, reward
  from jaxalign.steps.state import create

  cfg = jaxalign_cfg()
  params = {"model": transformer.init_params(cfg, jax.random.key(0))}
  if kind == "reward":
    params["head"] = heads.init_head(cfg, jax.random.key(1))
  ocfg = base("dpo").optimizer
  with ocfg.unlocked():
    ocfg.learning_rate, ocfg.schedule, ocfg.clip_norm = LR, "constant", 0.0
  tx, _ = make_optimizer(ocfg, params, 100)
  state = create(params, tx, 0)
  rng = np.random.default_rng(0)
  toks = rng.integers(0, VOCAB, (BATCH, 2, SEQ + 1)).astype(np.int32)
  w = np.zeros((BATCH, 2, SEQ), np.float32)
  w[..., -LOSS_TOKENS:] = 1
  b = {"tokens": jnp.asarray(toks[..., :-1]), "targets": jnp.asarray(toks[..., 1:]), "weights": jnp.asarray(w),
       "positions": jnp.broadcast_to(jnp.arange(SEQ, dtype=jnp.int32), (BATCH, 2, SEQ)),
       "segment_ids": jnp.ones((BATCH, 2, SEQ), jnp.int32), "margin": jnp.zeros(BATCH), "valid": jnp.ones(BATCH)}
  if kind == "dpo":
    import importlib.util
    import os
    spec = importlib.util.spec_from_file_location("c", os.path.join(os.path.dirname(__file__), "..", "configs", "dpo.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    loss_cfg = mod.get_config().loss
    state = state._replace(frozen={"reference": transformer.init_params(cfg, jax.random.key(0))})
    fn = functools.partial(dpo.dpo_step, model_cfg=cfg, loss_cfg=loss_cfg, tx=tx)
  else:
    fn = functools.partial(reward.reward_step, model_cfg=cfg, tx=tx)
  step = jax.jit(fn, donate_argnums=0)
  compile_s, times, _ = _timed(lambda st: (lambda o: (o[0], o[1]["loss"]))(step(st, b)), state, steps)
  return _stats(times, compile_s, pairs_per_step=BATCH)


def jaxalign_sampler(reps=5):
  import jax
  import jax.numpy as jnp
  from jaxalign import sampling
  from jaxalign.models import transformer

  cfg = jaxalign_cfg()
  params = transformer.init_params(cfg, jax.random.key(0))
  toks = jnp.asarray(np.random.default_rng(0).integers(0, VOCAB, (BATCH, PROMPT)).astype(np.int32))
  mask = jnp.ones_like(toks)
  gen = functools.partial(sampling.generate, cfg, max_new_tokens=NEW, temperature=1.0)
  t = time.perf_counter()
  jax.block_until_ready(gen(params, toks, mask, jax.random.key(0)).tokens)
  compile_s = time.perf_counter() - t
  times = []
  for i in range(reps):
    t = time.perf_counter()
    out = gen(params, toks, mask, jax.random.key(i + 1))
    jax.block_until_ready(out.tokens)
    times.append(time.perf_counter() - t)
  return _stats(times, compile_s, new_tokens=BATCH * NEW)


# ----------------------------------------------------------------------------------------------- plain JAX

def plain_jax_sft(steps=12, seq=SEQ, batch=BATCH):
  """The floor: a minimal hand-written Llama and a hand-written jitted AdamW step."""
  import jax
  import jax.numpy as jnp

  hd = HIDDEN // HEADS
  key = jax.random.key(0)
  ks = iter(jax.random.split(key, 16))
  n = lambda *s: 0.02 * jax.random.normal(next(ks), s)  # noqa: E731
  p = {"emb": n(VOCAB, HIDDEN), "head": n(HIDDEN, VOCAB), "norm": jnp.ones(HIDDEN),
       "wq": n(LAYERS, HIDDEN, HEADS * hd), "wk": n(LAYERS, HIDDEN, KV_HEADS * hd), "wv": n(LAYERS, HIDDEN, KV_HEADS * hd),
       "wo": n(LAYERS, HEADS * hd, HIDDEN), "wg": n(LAYERS, HIDDEN, INTER), "wu": n(LAYERS, HIDDEN, INTER),
       "wd": n(LAYERS, INTER, HIDDEN), "n1": jnp.ones((LAYERS, HIDDEN)), "n2": jnp.ones((LAYERS, HIDDEN))}
  inv = 1.0 / THETA ** (jnp.arange(0, hd, 2) / hd)
  ang = jnp.arange(seq)[:, None] * inv
  cos, sin = jnp.cos(jnp.concatenate([ang, ang], -1)), jnp.sin(jnp.concatenate([ang, ang], -1))
  causal = jnp.tril(jnp.ones((seq, seq), bool))

  def rms(x, w):
    return x * jax.lax.rsqrt(jnp.mean(x * x, -1, keepdims=True) + EPS) * w

  def rope(x):
    h = x.shape[-1] // 2
    return x * cos[:, None, None] + jnp.concatenate([-x[..., h:], x[..., :h]], -1) * sin[:, None, None]

  def layer(x, l):
    b, t, _ = x.shape
    h = rms(x, l["n1"])
    q = rope((h @ l["wq"]).reshape(b, t, KV_HEADS, HEADS // KV_HEADS, hd))
    k = rope((h @ l["wk"]).reshape(b, t, KV_HEADS, hd)[:, :, :, None])[:, :, :, 0]
    v = (h @ l["wv"]).reshape(b, t, KV_HEADS, hd)
    s = jnp.einsum("btkgh,bskh->bkgts", q, k) / jnp.sqrt(hd)
    a = jax.nn.softmax(jnp.where(causal, s, -1e30), -1)
    o = jnp.einsum("bkgts,bskh->btkgh", a, v).reshape(b, t, HEADS * hd)
    x = x + o @ l["wo"]
    h = rms(x, l["n2"])
    return x + (jax.nn.silu(h @ l["wg"]) * (h @ l["wu"])) @ l["wd"], None

  def loss_fn(p, inp, tgt):
    x = p["emb"][inp]
    layers = {k: p[k] for k in ("wq", "wk", "wv", "wo", "wg", "wu", "wd", "n1", "n2")}
    x, _ = jax.lax.scan(layer, x, layers)
    logits = rms(x, p["norm"])[:, -LOSS_TOKENS:] @ p["head"]
    lp = jax.nn.log_softmax(logits)
    return -jnp.mean(jnp.take_along_axis(lp, tgt[:, -LOSS_TOKENS:, None], -1))

  def step(p, m, v, t, inp, tgt):
    loss, g = jax.value_and_grad(loss_fn)(p, inp, tgt)
    t = t + 1
    m = jax.tree.map(lambda a, b: 0.9 * a + 0.1 * b, m, g)
    v = jax.tree.map(lambda a, b: 0.999 * a + 0.001 * b * b, v, g)
    p = jax.tree.map(lambda w, a, b: w - LR * ((a / (1 - 0.9 ** t)) / (jnp.sqrt(b / (1 - 0.999 ** t)) + 1e-8) + 0.01 * w),
                     p, m, v)
    return p, m, v, t, loss

  jstep = jax.jit(step, donate_argnums=(0, 1, 2))
  m = jax.tree.map(jnp.zeros_like, p)
  v = jax.tree.map(jnp.zeros_like, p)
  t = jnp.zeros((), jnp.float32)
  inp, tgt = map(jnp.asarray, _batch(seq, batch))
  def one(c):
    *c, loss = jstep(*c, inp, tgt)
    return tuple(c), loss

  compile_s, times, _ = _timed(one, (p, m, v, t), steps)
  return _stats(times, compile_s, tokens_per_step=seq * batch)


def peak_matmul_flops(n=2048, reps=5):
  """Measured peak float32 matmul FLOP/s of this machine (XLA CPU)."""
  import jax
  a = jax.random.normal(jax.random.key(0), (n, n))
  b = jax.random.normal(jax.random.key(1), (n, n))
  f = jax.jit(lambda x, y: x @ y)
  jax.block_until_ready(f(a, b))
  times = []
  for _ in range(reps):
    t = time.perf_counter()
    jax.block_until_ready(f(a, b))
    times.append(time.perf_counter() - t)
  return {"flops": 2 * n ** 3 / min(times), "n": n}


# ----------------------------------------------------------------------------------------------- PyTorch

def _torch_model():
  import torch
  import transformers
  torch.manual_seed(0)
  cfg = transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=INTER,
                                 num_hidden_layers=LAYERS, num_attention_heads=HEADS, num_key_value_heads=KV_HEADS,
                                 rope_theta=THETA, rms_norm_eps=EPS, tie_word_embeddings=False,
                                 max_position_embeddings=4096, attn_implementation="sdpa")
  return transformers.LlamaForCausalLM(cfg).float()


def torch_sft(steps=12, seq=SEQ, batch=BATCH):
  import torch
  torch.set_num_threads(max(1, torch.get_num_threads()))
  model = _torch_model().train()
  opt = torch.optim.AdamW(model.parameters(), lr=LR)
  inp, tgt = (torch.tensor(x).long() for x in _batch(seq, batch))

  def step():
    logits = model(input_ids=inp).logits[:, -LOSS_TOKENS:]
    loss = torch.nn.functional.cross_entropy(logits.reshape(-1, VOCAB), tgt[:, -LOSS_TOKENS:].reshape(-1))
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    return loss

  times = []
  for i in range(steps + 2):
    t = time.perf_counter()
    step()
    if i >= 2:
      times.append(time.perf_counter() - t)
  return _stats(times, None, tokens_per_step=seq * batch, threads=torch.get_num_threads())


def torch_dpo(steps=10):
  """DPO step in eager PyTorch (policy + no-grad reference, chosen and rejected in one forward), as TRL does."""
  import torch
  model, ref = _torch_model().train(), _torch_model().eval()
  opt = torch.optim.AdamW(model.parameters(), lr=LR)
  rng = np.random.default_rng(0)
  toks = torch.tensor(rng.integers(0, VOCAB, (2 * BATCH, SEQ + 1))).long()
  inp, tgt = toks[:, :-1], toks[:, 1:]

  def logps(m):
    lp = torch.log_softmax(m(input_ids=inp).logits[:, -LOSS_TOKENS:].float(), -1)
    return lp.gather(-1, tgt[:, -LOSS_TOKENS:, None])[..., 0].sum(-1)

  def step():
    pol = logps(model)
    with torch.no_grad():
      r = logps(ref)
    h = (pol[:BATCH] - pol[BATCH:]) - (r[:BATCH] - r[BATCH:])
    loss = -torch.nn.functional.logsigmoid(0.1 * h).mean()
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)

  times = []
  for i in range(steps + 2):
    t = time.perf_counter()
    step()
    if i >= 2:
      times.append(time.perf_counter() - t)
  return _stats(times, None, pairs_per_step=BATCH)


def torch_generate(reps=3):
  import torch
  model = _torch_model().eval()
  toks = torch.tensor(np.random.default_rng(0).integers(0, VOCAB, (BATCH, PROMPT))).long()
  times = []
  with torch.no_grad():
    model.generate(toks, attention_mask=torch.ones_like(toks), max_new_tokens=4, min_new_tokens=4, do_sample=True)
    for _ in range(reps):
      t = time.perf_counter()
      model.generate(toks, attention_mask=torch.ones_like(toks), max_new_tokens=NEW, min_new_tokens=NEW,
                     do_sample=True, temperature=1.0, top_k=0, pad_token_id=0)
      times.append(time.perf_counter() - t)
  return _stats(times, None, new_tokens=BATCH * NEW)
