"""Train a small byte-level BPE tokenizer in Hugging Face format (for built-in tasks and tests; no download)."""

from __future__ import annotations

from typing import Iterable

SPECIALS = ["<pad>", "<s>", "</s>", "<|im_start|>", "<|im_end|>"]


def train_tokenizer(texts: Iterable[str], vocab_size: int = 512, chat_template: str = "chatml"):
  """A PreTrainedTokenizerFast with pad/bos/eos and a ChatML template, trained on `texts`."""
  from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
  from transformers import PreTrainedTokenizerFast

  from jaxalign.data.examples import CHAT_TEMPLATES

  tok = Tokenizer(models.BPE())
  tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  tok.decoder = decoders.ByteLevel()
  tok.post_processor = processors.ByteLevel(trim_offsets=False)
  trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIALS,
                                initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
  tok.train_from_iterator(texts, trainer)
  fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<s>", eos_token="</s>",
                                 additional_special_tokens=["<|im_start|>", "<|im_end|>"])
  fast.chat_template = CHAT_TEMPLATES.get(chat_template, chat_template)
  return fast
