"""A tiny randomly initialised BERT (with a real WordPiece tokenizer) for fast tests.

Written to a local directory, it exercises the same `from_pretrained(path)` code path users take
with their own models, in a fraction of a second per training step.
"""

from __future__ import annotations

import re
from pathlib import Path

SPECIALS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]


def build(directory: Path, corpus: list[str], hidden: int = 32, layers: int = 2) -> Path:
    from transformers import BertConfig, BertForMaskedLM, BertTokenizerFast

    words = sorted({w for text in corpus for w in re.findall(r"\w+|[^\w\s]", text.lower())})
    directory.mkdir(parents=True, exist_ok=True)
    vocab = directory / "vocab.txt"
    vocab.write_text("\n".join(SPECIALS + words) + "\n", encoding="utf-8")
    tokenizer = BertTokenizerFast(vocab_file=str(vocab), do_lower_case=True, model_max_length=128)
    tokenizer.save_pretrained(directory)
    config = BertConfig(vocab_size=len(SPECIALS) + len(words), hidden_size=hidden, num_hidden_layers=layers,
                        num_attention_heads=2, intermediate_size=hidden * 2, max_position_embeddings=128)
    BertForMaskedLM(config).save_pretrained(directory)
    return directory
