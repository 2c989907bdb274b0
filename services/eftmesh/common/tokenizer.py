"""Tokenizer identity: models can be mixed only when their tokenizers agree id for id.

The fingerprint covers what decoding across models depends on, and nothing else:

- the token-to-id map (`get_vocab()`, added tokens included): per-step logit arithmetic
  adds row i of one model to row i of another, so every id must mean the same string;
- the added tokens with their ids and whether each is special (special ones are left out
  of the text when decoding);
- the special tokens with their ids (EOS, BOS, UNK, additional special tokens, ...);
- the EOS and BOS ids: generation stops at EOS, and prompts start with BOS.

Not the tokenizer's class, nor its pad token (padding never reaches a model here: sessions
are scored one sequence at a time), nor other configuration such as `model_max_length`:
transformers loads byte-identical tokenizer files as different classes depending on the
checkpoint's `config.json` (a qwen2 checkpoint gets a pad token, a GPT-2 one none), and
those must agree. A pad token that is a new token (an id the others lack) still differs,
through the token-to-id map.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

# The parts of a fingerprint, in the order `describe_difference` names them.
PARTS = ("vocab", "added", "special", "eos", "bos")


def _digest(obj: Any) -> str:
    blob = json.dumps(obj, ensure_ascii=False, sort_keys=True).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def _token_id(tokenizer: Any, token: str) -> int | None:
    tid = tokenizer.convert_tokens_to_ids(token)
    return tid if isinstance(tid, int) else None


def _flat(value: Any) -> list[str]:
    if value is None:
        return []
    if isinstance(value, (list, tuple)):
        return [str(v) for v in value]
    return [str(value)]


def _special_tokens(tokenizer: Any) -> set[str]:
    """The special tokens' strings, the pad token left out unless it is another role's too."""
    named = dict(getattr(tokenizer, "special_tokens_map", None) or {})
    pad = set(_flat(named.pop("pad_token", None)))
    kept = {t for v in named.values() for t in _flat(v)}
    every = kept | {str(t) for t in (getattr(tokenizer, "all_special_tokens", None) or [])}
    return every - (pad - kept)


def fingerprint_parts(tokenizer: Any) -> dict[str, str]:
    """Each part the fingerprint covers, on its own: "vocab", "added" and "special" as 16-hex
    digests, "eos" and "bos" as the ids ("none" when unset). Two tokenizers whose parts are
    equal have equal fingerprints."""
    special = _special_tokens(tokenizer)
    pad_only = set(_flat((getattr(tokenizer, "special_tokens_map", None) or {}).get("pad_token"))) - special
    vocab = sorted(((str(t), int(i)) for t, i in tokenizer.get_vocab().items()), key=lambda kv: (kv[1], kv[0]))
    added_decoder = getattr(tokenizer, "added_tokens_decoder", None) or {}
    added = sorted(
        (int(i), str(getattr(t, "content", t)), bool(getattr(t, "special", False)))
        for i, t in added_decoder.items() if str(getattr(t, "content", t)) not in pad_only
    )
    specials = sorted((t, _token_id(tokenizer, t)) for t in special)
    specials_json = [[t, -1 if i is None else i] for t, i in specials]

    def one(name: str) -> str:
        tid = getattr(tokenizer, f"{name}_token_id", None)
        return "none" if tid is None else str(int(tid))

    return {
        "vocab": _digest(vocab),
        "added": _digest(added),
        "special": _digest(specials_json),
        "eos": one("eos"),
        "bos": one("bos"),
    }


def combine(parts: dict[str, str]) -> str:
    """The fingerprint of `fingerprint_parts`' result."""
    return _digest({k: parts[k] for k in PARTS})


def fingerprint(tokenizer: Any) -> str:
    """SHA-256 over the token-to-id map, the added and special tokens with their ids and the
    EOS/BOS ids, as 16 hex digits (see the module's docstring for what is left out).

    Two tokenizers with equal fingerprints map every id to the same string, which is what
    per-step logit arithmetic across models needs; merges and normalisation only matter for
    encoding, which the combiner alone does.
    """
    return combine(fingerprint_parts(tokenizer))


def describe_difference(a: dict[str, str], b: dict[str, str]) -> str:
    """Which parts of two `fingerprint_parts` results differ, in words ("" when none)."""
    words = {"vocab": "token-to-id map", "added": "added tokens", "special": "special tokens",
             "eos": "EOS id", "bos": "BOS id"}
    out = []
    for k in PARTS:
        if a.get(k) != b.get(k):
            out.append(f"{words[k]} ({a.get(k)} vs {b.get(k)})" if k in ("eos", "bos") else words[k])
    return ", ".join(out)
