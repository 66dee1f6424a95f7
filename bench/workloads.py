"""The fixed benchmark workload (issue 8) and each contender's step, one function per (contender, figure).

Each function returns {'median_s', 'min_s', 'max_s', 'compile_s', ...} for the timed calls after warm-up.
"""

from __future__ import annotations

import functools
import os
import time

import numpy as np

VOCAB, HIDDEN, INTER, LAYERS, HEADS, KV_HEADS, THETA, EPS = 2048, 256, 688, 4, 8, 4, 10000.0, 1e-5
SEQ, BATCH, LR, LOSS_TOKENS = 256, 8, 1e-5, 128
PROMPT, NEW = 128, 128


def _stats(times, compile_s=None, **extra):
  t = np.asarray(times)
  return {"median_s": float(np.median(t)), "min_s": float(t.min()), "max_s": float(t.max()),
          "n": len(times), "compile_s": compile_s, "times": [float(x) for x in t], **extra}


def _gate():
  """Wait for this contender's turn: `bench/run.py --paired` runs two contenders in lockstep, one step each in
  turn (bench/lockstep.py), and passes the two ends of its pipes in $JAXALIGN_BENCH_GATE. A no-op otherwise."""
  fds = os.environ.get("JAXALIGN_BENCH_GATE")
  if fds:
    go, ready = map(int, fds.split(","))
    os.write(ready, b"r")
    if not os.read(go, 1):
      raise SystemExit("bench: the lockstep parent is gone")


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
    _gate()
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
  """The bench preset with the setting a user picks for a 4-layer model: layers unrolled (`model.scan_layers=
  false`; the scan is for compile time on deep models). Measured ~5-15% faster per SFT step here."""
  from jaxalign.models.config import preset
  return preset("bench", **{"scan_layers": False, **kw})


def jaxalign_sft(steps=12, seq=SEQ, batch=BATCH, **cfg_kw):
  import jax
  import jax.numpy as jnp
  from jaxalign.config import base
  from jaxalign.data import batching
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
  b = {"tokens": inp, "targets": tgt, "weights": w, "segment_ids": np.ones((batch, seq), np.int32),
       "positions": np.broadcast_to(np.arange(seq, dtype=np.int32), (batch, seq))}
  # As the data pipeline cuts it: targets/weights from the first trained column on (data.loss_window=4).
  b = {k: jnp.asarray(v) for k, v in
       batching.cut_window(b, batching.loss_window(max(seq - LOSS_TOKENS, 0), seq, 4)).items()}
  step = jax.jit(functools.partial(sft.sft_step, model_cfg=cfg, tx=tx), donate_argnums=0)
  compile_s, times, loss = _timed(lambda st: (lambda o: (o[0], o[1]["loss"]))(step(st, b)), state, steps)
  return _stats(times, compile_s, tokens_per_step=seq * batch, loss=float(loss))


def jaxalign_pairs(kind="dpo", steps=10):
  """Reward-model or DPO step on B pairs of (prompt 128 + response 128)."""
  import jax
  import jax.numpy as jnp
  from jaxalign.config import base
  from jaxalign.data import batching
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
  b = {"tokens": toks[..., :-1], "targets": toks[..., 1:], "weights": w, "segment_ids": np.ones((BATCH, 2, SEQ), np.int32),
       "positions": np.broadcast_to(np.arange(SEQ, dtype=np.int32), (BATCH, 2, SEQ)),
       "margin": np.zeros(BATCH, np.float32), "valid": np.ones(BATCH, np.float32)}
  if kind == "dpo":  # As the pipeline cuts DPO batches (data.loss_window=4); the reward step reads no targets.
    b = batching.cut_window(b, batching.loss_window(SEQ - LOSS_TOKENS, SEQ, 4))
  b = {k: jnp.asarray(v) for k, v in b.items()}
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
  """The floor: a minimal hand-written Llama and a hand-written jitted AdamW step, with the same XLA:CPU
  choices as jaxalign's bench config (2-D matmuls, unrolled layers) and logits only for the loss tokens."""
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

  def mm(x, w):  # One 2-D matmul (XLA:CPU's fast path for the weight gradient; see models.transformer.dense).
    return (x.reshape(-1, x.shape[-1]) @ w).reshape(*x.shape[:-1], w.shape[-1])

  def layer(x, l):
    b, t, _ = x.shape
    h = rms(x, l["n1"])
    q = rope(mm(h, l["wq"]).reshape(b, t, KV_HEADS, HEADS // KV_HEADS, hd))
    k = rope(mm(h, l["wk"]).reshape(b, t, KV_HEADS, hd)[:, :, :, None])[:, :, :, 0]
    v = mm(h, l["wv"]).reshape(b, t, KV_HEADS, hd)
    s = jnp.einsum("btkgh,bskh->bkgts", q, k) / jnp.sqrt(hd)
    a = jax.nn.softmax(jnp.where(causal, s, -1e30), -1)
    o = jnp.einsum("bkgts,bskh->btkgh", a, v).reshape(b, t, HEADS * hd)
    x = x + mm(o, l["wo"])
    h = rms(x, l["n2"])
    return x + mm(jax.nn.silu(mm(h, l["wg"])) * mm(h, l["wu"]), l["wd"]), None

  def loss_fn(p, inp, tgt):
    x = p["emb"][inp]
    layers = {k: p[k] for k in ("wq", "wk", "wv", "wo", "wg", "wu", "wd", "n1", "n2")}
    for i in range(LAYERS):  # Unrolled, as the jaxalign bench config.
      x, _ = layer(x, {k: v[i] for k, v in layers.items()})
    logits = mm(rms(x, p["norm"])[:, -LOSS_TOKENS:], p["head"])
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
    _gate()
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
    _gate()
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


# ----------------------------------------------------------------------------------------------- TRL
# TRL's own trainers on the same model, data shapes and optimizer; each optimizer step (for GRPO: one
# iteration = generation + scoring + update) is timed by a callback, medians after 2 warm-up steps.

GROUP, RL_PROMPTS, RL_PROMPT_LEN, RL_NEW = 4, 8, 64, 64  # GRPO/PPO iteration: 8 prompts x 4 samples, 64 + 64 tokens.


def _trl_tokenizer():
  """A real BPE tokenizer (trained here; no hub) whose ids fit the bench vocabulary."""
  import transformers
  from jaxalign.data.tasks.tokenizer import train_tokenizer
  words = [f"w{i}" for i in range(3000)]
  tok = train_tokenizer([" ".join(words[i:i + 50]) for i in range(0, 3000, 7)], vocab_size=VOCAB)
  assert len(tok) <= VOCAB, len(tok)
  return transformers.PreTrainedTokenizerFast(tokenizer_object=tok.backend_tokenizer, bos_token=tok.bos_token,
                                              eos_token=tok.eos_token, pad_token=tok.pad_token)


class _StepTimer:
  def __init__(self):
    import transformers
    outer = self

    class CB(transformers.TrainerCallback):
      def on_step_begin(self, *a, **k):
        _gate()
        outer.t = time.perf_counter()

      def on_step_end(self, *a, **k):
        outer.times.append(time.perf_counter() - outer.t)

    self.times, self.cb = [], CB()


def _trl_common(steps, **kw):
  """TRL 1.x configs default to bf16=True and gradient_checkpointing=True; the fixed workload is float32
  without rematerialisation (as jaxalign and the PyTorch baseline run it), so both are turned off."""
  return dict(bf16=False, fp16=False, gradient_checkpointing=False, output_dir="/tmp/jaxalign_bench_trl",
              max_steps=steps + 2, learning_rate=LR, lr_scheduler_type="constant", weight_decay=0.0, max_grad_norm=0.0,
              logging_steps=10_000, save_strategy="no", report_to="none", use_cpu=True, dataloader_num_workers=0,
              seed=0, disable_tqdm=True, **kw)


def trl_sft(steps=12):
  import datasets
  import trl
  rng = np.random.default_rng(0)
  rows = []
  for _ in range(BATCH * (steps + 3)):
    ids = rng.integers(3, VOCAB, SEQ + 1).tolist()
    rows.append({"input_ids": ids, "labels": [-100] * (SEQ + 1 - LOSS_TOKENS) + ids[-LOSS_TOKENS:]})
  timer = _StepTimer()
  args = trl.SFTConfig(per_device_train_batch_size=BATCH, max_length=SEQ + 1, packing=False,
                       dataset_kwargs={"skip_prepare_dataset": True}, remove_unused_columns=False,
                       **_trl_common(steps))
  trainer = trl.SFTTrainer(model=_torch_model(), args=args, train_dataset=datasets.Dataset.from_list(rows),
                           processing_class=_trl_tokenizer(), callbacks=[timer.cb])
  trainer.train()
  return _stats(timer.times[2:], None, tokens_per_step=SEQ * BATCH)


def trl_dpo(steps=10):
  import datasets
  import trl
  rng = np.random.default_rng(0)
  tok = _trl_tokenizer()
  p = SEQ - LOSS_TOKENS
  grow = len(tok(tok.decode(rng.integers(3, len(tok), 1024).tolist()))["input_ids"]) / 1024  # Re-tokenising grows.
  text = lambda n: tok.decode(rng.integers(3, len(tok), round(n / grow)).tolist())  # noqa: E731 - TRL tokenizes.
  rows = [{"prompt": text(p), "chosen": text(LOSS_TOKENS), "rejected": text(LOSS_TOKENS)}
          for _ in range(BATCH * (steps + 3))]
  timer = _StepTimer()
  args = trl.DPOConfig(per_device_train_batch_size=BATCH, max_length=SEQ + 8, beta=0.1, **_trl_common(steps))
  trainer = trl.DPOTrainer(model=_torch_model(), ref_model=_torch_model(), args=args,
                           train_dataset=datasets.Dataset.from_list(rows), processing_class=tok,
                           callbacks=[timer.cb])
  n = [len(tok(r["prompt"] + r["chosen"])["input_ids"]) for r in rows[:32]]
  assert abs(np.mean(n) - SEQ) < 0.1 * SEQ, f"re-tokenised pair length {np.mean(n)} is not ~{SEQ}"
  trainer.train()
  return _stats(timer.times[2:], None, pairs_per_step=BATCH)


def length_reward(prompts, completions, **_):
  """The benchmark's verifiable reward: a cheap Python function of the decoded text (both sides use it)."""
  return [len(c) % 13 / 13.0 for c in completions]


def _rl_prompts(tok, n):
  """Prompt texts that re-tokenise to about RL_PROMPT_LEN tokens (TRL tokenizes text itself)."""
  rng = np.random.default_rng(0)
  grow = len(tok(tok.decode(rng.integers(3, len(tok), 1024).tolist()))["input_ids"]) / 1024
  return [tok.decode(rng.integers(3, len(tok), round(RL_PROMPT_LEN / grow)).tolist()) for _ in range(n)]


def trl_grpo(steps=5):
  import datasets
  import trl
  tok = _trl_tokenizer()
  ds = datasets.Dataset.from_list([{"prompt": p} for p in _rl_prompts(tok, RL_PROMPTS * (steps + 3))])
  timer = _StepTimer()
  args = trl.GRPOConfig(per_device_train_batch_size=RL_PROMPTS * GROUP, num_generations=GROUP,
                        max_completion_length=RL_NEW, temperature=1.0, top_k=0, beta=0.04, num_iterations=1,
                        steps_per_generation=1, shuffle_dataset=False, **_trl_common(steps))
  import tempfile
  path = tempfile.mkdtemp()  # TRL builds its reference model from the policy's path.
  _torch_model().save_pretrained(path)
  trainer = trl.GRPOTrainer(model=path, reward_funcs=length_reward, args=args, train_dataset=ds,
                            processing_class=tok, callbacks=[timer.cb])
  trainer.train()
  return _stats(timer.times[2:], None, samples_per_iteration=RL_PROMPTS * GROUP)


def _rl_config(name, **groups):
  """The stage's default config with the bench's rollout shape and optimizer (no weights or data read)."""
  import importlib.util
  import os

  spec = importlib.util.spec_from_file_location(f"bench_{name}", os.path.join(os.path.dirname(__file__), "..",
                                                                                 "configs", f"{name}.py"))
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  c = mod.get_config()
  with c.unlocked():
    c.train.batch_size = RL_PROMPTS
    c.rollout.prompt_len, c.train.seq_len = RL_PROMPT_LEN, RL_PROMPT_LEN + RL_NEW
    c.rollout.temperature, c.rollout.top_k, c.rollout.top_p = 1.0, 0, 1.0
    c.optimizer.learning_rate, c.optimizer.schedule, c.optimizer.clip_norm = LR, "constant", 0.0
    c.optimizer.weight_decay = 0.0
    for group, values in groups.items():
      for key, value in values.items():
        c[group][key] = value
  return c


def _one_device_mesh():
  import jax
  from jaxalign import sharding
  return sharding.make_mesh(1, 1, 1, devices=jax.devices()[:1])


def jaxalign_grpo(steps=5):
  """One GRPO iteration exactly as training runs it: `loops.grpo.jit_iteration` (the stage's jitted rollout,
  host decode + Python reward, jitted update; reference KL on, like TRL's beta) over the package's
  `steps.grpo.grpo_iteration`."""
  import jax
  import jax.numpy as jnp
  from jaxalign import sharding
  from jaxalign.data.prompts import left_pad
  from jaxalign.loops import grpo, ppo, setup
  from jaxalign.models import transformer

  tok = _trl_tokenizer()
  cfg = jaxalign_cfg()
  c = _rl_config("grpo", grpo={"group_size": GROUP, "kl_coef": 0.04})
  mesh = _one_device_mesh()
  rep = sharding.replicated(mesh)
  params = jax.device_put({"model": transformer.init_params(cfg, jax.random.key(0))}, rep)
  tx, sched = setup.optimizer(c, params, 100)
  frozen = {"reference": jax.tree.map(jnp.copy, params["model"])}
  state = setup.new_state(params, tx, 0, mesh, frozen=frozen)
  iteration = grpo.jit_iteration(state, mesh, cfg, c, ppo.rollout_settings(c), tx, sched,
                                 [("length_reward", length_reward, 1.0)], tok)
  prompts = _rl_prompts(tok, RL_PROMPTS)
  toks, mask = left_pad([np.asarray(tok(p)["input_ids"]) for p in prompts], RL_PROMPT_LEN, tok.pad_token_id)
  batch = jax.device_put({"prompts": toks, "prompt_mask": mask}, sharding.batch_sharding(mesh))

  def one(st):
    st, m = iteration(st, batch)
    return st, m["loss"]

  compile_s, times, _ = _timed(one, state, steps)
  return _stats(times, compile_s, samples_per_iteration=RL_PROMPTS * GROUP)


def jaxalign_ppo(steps=5):
  """One PPO iteration exactly as training runs it: `loops.ppo.jit_iteration` over the package's
  `steps.ppo.ppo_iteration` (rollout of RL_PROMPTS x GROUP samples, policy/reference/reward/value passes, GAE,
  1 epoch x 1 minibatch of clipped policy and value updates)."""
  import jax
  import jax.numpy as jnp
  from jaxalign import sharding
  from jaxalign.loops import ppo, setup
  from jaxalign.models import heads, transformer
  from jaxalign.steps import ppo as ppo_steps

  tok = _trl_tokenizer()
  cfg = jaxalign_cfg()
  c = _rl_config("ppo", ppo={"epochs": 1, "minibatches": 1})
  with c.unlocked():
    c.train.batch_size = RL_PROMPTS * GROUP
  mesh = _one_device_mesh()
  rep = sharding.replicated(mesh)
  copy = lambda t: jax.tree.map(jnp.copy, t)  # noqa: E731
  model = transformer.init_params(cfg, jax.random.key(0))
  pol_p = jax.device_put({"model": model}, rep)
  val_p = jax.device_put({"model": copy(model), "head": heads.init_head(cfg, jax.random.key(1))}, rep)
  pol_opt, val_opt = setup.optimizer(c, pol_p, 100), setup.optimizer(c, val_p, 100)
  frozen = jax.device_put({"reference": copy(model),
                           "reward": {"model": copy(model), "head": heads.init_head(cfg, jax.random.key(2))}}, rep)
  state = jax.jit(lambda p, v: ppo_steps.create_state(p, v, pol_opt[0], val_opt[0], 0, 0.05, None))(pol_p, val_p)
  state = state._replace(frozen=frozen)
  iteration = ppo.jit_iteration(state, mesh, cfg, c, ppo.rollout_settings(c), pol_opt, val_opt, tok)
  rng = np.random.default_rng(0)
  toks = rng.integers(3, VOCAB, (RL_PROMPTS * GROUP, RL_PROMPT_LEN)).astype(np.int32)
  batch = jax.device_put({"prompts": toks, "prompt_mask": np.ones_like(toks)}, sharding.batch_sharding(mesh))

  def one(st):
    st, m = iteration(st, batch)
    return st, m["policy_loss"]

  compile_s, times, _ = _timed(one, state, steps)
  return _stats(times, compile_s, samples_per_iteration=RL_PROMPTS * GROUP)
