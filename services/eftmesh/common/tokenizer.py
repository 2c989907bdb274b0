"""Tokenizer identity: models can be mixed only when their tokenizers agree id for id."""

from __future__ import annotations

import hashlib
import json
from typing import Any


def fingerprint(tokenizer: Any) -> str:
    """SHA-256 over the token-to-id map and the special tokens, as 16 hex digits.

    Two tokenizers with equal fingerprints map every id to the same string, which is what
    per-step logit arithmetic across models needs; merges and normalisation only matter for
    encoding, which the combiner alone does.
    """
    vocab = sorted(tokenizer.get_vocab().items(), key=lambda kv: kv[1])
    special = sorted((str(k), str(v)) for k, v in tokenizer.special_tokens_map.items())
    blob = json.dumps({"vocab": vocab, "special": special}, ensure_ascii=False).encode()
    return hashlib.sha256(blob).hexdigest()[:16]
