"""Prompt streams for online RL and sampled evaluation: left-padded [b, P] batches, resumable."""

from __future__ import annotations

import numpy as np

from jaxalign.data import batching


class PromptIterator:
  """Endless, resumable batches of this process's rows: {'prompts', 'prompt_mask'} [b, P], left-padded."""

  def __init__(self, prompts: list, *, batch_size: int, prompt_len: int, seed: int, pad_id: int):
    self.prompts, self.b, self.p, self.seed, self.pad = prompts, batch_size, prompt_len, seed, pad_id
    self.epoch, self.index = 0, 0
    self.last: list = []  # This process's examples of the batch last returned (their text and columns).
    if len(prompts) < batch_size:
      raise ValueError(f"{len(prompts)} prompts make no batch of rollout.batch_size={batch_size}")

  def state(self) -> dict:
    return {"epoch": self.epoch, "index": self.index}

  def restore(self, st: dict):
    self.epoch, self.index = int(st["epoch"]), int(st["index"])

  def __iter__(self):
    return self

  def __next__(self) -> dict[str, np.ndarray]:
    n = len(self.prompts) // self.b
    if self.index >= n:
      self.epoch, self.index = self.epoch + 1, 0
    order = np.random.default_rng([self.seed, self.epoch, 17]).permutation(len(self.prompts))
    idx = order[self.index * self.b:(self.index + 1) * self.b][batching.host_rows(self.b)]
    self.index += 1
    self.last = [self.prompts[i] for i in idx]
    toks, mask = left_pad([self.prompts[i].ids for i in idx], self.p, self.pad)
    return {"prompts": toks, "prompt_mask": mask}


def left_pad(prompts: list[np.ndarray], length: int, pad_id: int):
  """Token lists -> (tokens, mask) [n, length], right-aligned; longer prompts keep their end."""
  toks = np.full((len(prompts), length), pad_id, np.int32)
  mask = np.zeros((len(prompts), length), np.int32)
  for i, p in enumerate(prompts):
    p = p[-length:]
    toks[i, length - len(p):] = p
    mask[i, length - len(p):] = 1
  return toks, mask


def stop_ids(tok, model_cfg=None, extra=()) -> tuple[int, ...]:
  """EOS and the end-of-turn tokens of the common chat templates that this tokenizer has (without a
  tokenizer, as in a compile plan: the model config's EOS ids)."""
  if tok is None:
    e = model_cfg.eos_token_id
    return tuple(e) if isinstance(e, (tuple, list)) else (int(e or 0),)
  ids = {tok.eos_token_id}
  for t in ("<|im_end|>", "<|eot_id|>", "<end_of_turn>", *extra):
    i = tok.convert_tokens_to_ids(t) if t in tok.get_vocab() else None
    if i is not None:
      ids.add(i)
  return tuple(sorted(i for i in ids if i is not None))


def pad_id(tok, model_cfg=None) -> int:
  return tok.pad_token_id if tok is not None else int(model_cfg.pad_token_id or 0)
