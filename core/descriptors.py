"""Text descriptors logged with every prediction and stored in the reference profile.

They are computed from the tokenizer output the model already produced (no second tokenisation)
and need no downloads, unlike Evidently's NLTK-based descriptors, which fail offline.
"""

from __future__ import annotations

DESCRIPTOR_COLUMNS = ("length_chars", "length_words", "tokens_per_word", "unknown_token_rate", "non_letter_share")


def describe(text: str, n_tokens: int, n_unknown: int) -> dict[str, float]:
    """Descriptors of one text; `n_tokens`/`n_unknown` count word-piece tokens without specials."""
    words = len(text.split())
    letters_or_space = sum(ch.isalpha() or ch.isspace() for ch in text)
    chars = len(text)
    return {
        "length_chars": float(chars),
        "length_words": float(words),
        "tokens_per_word": n_tokens / words if words else 0.0,
        "unknown_token_rate": n_unknown / n_tokens if n_tokens else 0.0,
        "non_letter_share": (chars - letters_or_space) / chars if chars else 0.0,
    }
