"""Text normalisation shared by the split-leakage check, the evaluator and the keyword rules."""

import re
import unicodedata

# Punctuation and symbols in any script (Unicode categories P* and S*), e.g. ，。？！、「」 as well as ASCII.
_DROP = {"P", "S"}
_SPACE = re.compile(r"\s+")


def normalize(text: str) -> str:
    """NFKC (full-width → half-width), lower-case, punctuation/symbols removed, whitespace collapsed."""
    text = unicodedata.normalize("NFKC", text).lower()
    text = "".join(" " if unicodedata.category(ch)[0] in _DROP else ch for ch in text)
    return _SPACE.sub(" ", text).strip()


def compact(text: str) -> str:
    """normalize() without any spaces: the key used to decide that two questions are the same."""
    return normalize(text).replace(" ", "")
