"""Byte-level BPE trained with the `tokenizers` library, wrapped as a `transformers` fast tokenizer.

Byte-level means every string round-trips (no unknown token): text -> UTF-8 bytes -> merges. Two specials:
`<|endoftext|>` (eos, separates documents) and `<|pad|>` (pad).
"""
from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

EOT = "<|endoftext|>"
PAD = "<|pad|>"
SPECIALS = (EOT, PAD)


def train_tokenizer(texts: Iterable[str], vocab_size: int):
    """Train a byte-level BPE of `vocab_size` tokens (256 bytes + 2 specials + merges) on `texts`."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    if isinstance(texts, str):
        raise TypeError("texts must be an iterable of strings, not one string")
    minimum = 256 + len(SPECIALS)
    if not isinstance(vocab_size, int) or vocab_size < minimum:
        raise ValueError(f"vocab_size must be an int >= {minimum} (256 bytes + specials), got {vocab_size!r}")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)   # GPT-2 split regex, then bytes
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=list(SPECIALS), show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(texts, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=EOT, pad_token=PAD,
                                   clean_up_tokenization_spaces=False)


def load_tokenizer(path: str | Path):
    """Load a tokenizer saved with `save_pretrained` (offline, from a local folder)."""
    from transformers import PreTrainedTokenizerFast

    path = Path(path)
    if not (path / "tokenizer.json").is_file():
        raise FileNotFoundError(f"no tokenizer.json in {path}")
    return PreTrainedTokenizerFast.from_pretrained(str(path))
