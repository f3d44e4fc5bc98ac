"""Training a byte-level BPE tokenizer on the fly (demo and from-scratch models)."""

from __future__ import annotations

import itertools
from pathlib import Path
from typing import Iterable

SPECIAL = {"bos": "<|begin_of_text|>", "eos": "<|end_of_text|>", "pad": "<|pad|>"}


def train_bpe(texts: Iterable[str], vocab_size: int, out_dir: str | Path, max_chars: int) -> None:
    """Train a GPT-2-style byte-level BPE and save it as a Hugging Face fast tokenizer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    def capped():
        n = 0
        for t in texts:
            yield t
            n += len(t)
            if n >= max_chars:
                return

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(SPECIAL.values()),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(capped(), trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token=SPECIAL["bos"], eos_token=SPECIAL["eos"], pad_token=SPECIAL["pad"]
    )
    fast.save_pretrained(str(out_dir))


def take(it: Iterable, n: int) -> list:
    return list(itertools.islice(it, n))
