"""The tokenizer fingerprint covers what decoding depends on (token-to-id map, added and
special tokens with their ids, EOS/BOS) and not the tokenizer's class or pad token."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from transformers import AutoTokenizer, GPT2TokenizerFast, PreTrainedTokenizerFast

from eftmesh.common.tokenizer import describe_difference, fingerprint, fingerprint_parts


@pytest.fixture(scope="module")
def tok_dir(tiny_family: dict[str, Path]) -> Path:
    return tiny_family["base-small"]


def test_same_files_other_class_and_pad_token_have_equal_fingerprints(tok_dir: Path) -> None:
    auto = AutoTokenizer.from_pretrained(str(tok_dir))
    generic = PreTrainedTokenizerFast.from_pretrained(str(tok_dir))
    gpt2_padded = GPT2TokenizerFast.from_pretrained(str(tok_dir), pad_token="<|endoftext|>")
    # A pad token that is an ordinary token of the vocabulary (no new id).
    ordinary = next(t for t, i in auto.get_vocab().items() if i == 100)
    other_pad = GPT2TokenizerFast.from_pretrained(str(tok_dir), pad_token=ordinary)
    assert gpt2_padded.pad_token_id is not None and other_pad.pad_token_id == 100
    assert type(generic) is not type(gpt2_padded) or type(auto) is not type(generic)
    fps = {fingerprint(t) for t in (auto, generic, gpt2_padded, other_pad)}
    assert len(fps) == 1


def test_other_config_is_ignored(tok_dir: Path, tmp_path: Path) -> None:
    copy = tmp_path / "tok"
    shutil.copytree(tok_dir, copy, ignore=shutil.ignore_patterns("*.safetensors", "*.bin"))
    cfg = json.loads((copy / "tokenizer_config.json").read_text())
    cfg["model_max_length"] = 4096
    cfg["padding_side"] = "left"
    (copy / "tokenizer_config.json").write_text(json.dumps(cfg))
    assert fingerprint(AutoTokenizer.from_pretrained(str(copy))) == fingerprint(AutoTokenizer.from_pretrained(str(tok_dir)))


def test_another_eos_id_changes_it_and_is_named(tok_dir: Path) -> None:
    base = AutoTokenizer.from_pretrained(str(tok_dir))
    ordinary = next(t for t, i in base.get_vocab().items() if i == 100)
    other = AutoTokenizer.from_pretrained(str(tok_dir), eos_token=ordinary)
    assert other.eos_token_id == 100
    assert fingerprint(other) != fingerprint(base)
    said = describe_difference(fingerprint_parts(base), fingerprint_parts(other))
    assert "EOS id (0 vs 100)" in said and "BOS" not in said and "token-to-id" not in said


class FakeTokenizer:
    """Duck-typed: what `fingerprint` reads, and nothing else."""

    def __init__(self, vocab: dict[str, int], eos: str = "<eos>", bos: str | None = None,
                 pad: str | None = None, extra: tuple[str, ...] = ()) -> None:
        self._vocab = vocab
        self.special_tokens_map: dict[str, object] = {"eos_token": eos}
        if bos:
            self.special_tokens_map["bos_token"] = bos
        if pad:
            self.special_tokens_map["pad_token"] = pad
        if extra:
            self.special_tokens_map["additional_special_tokens"] = list(extra)
        self.all_special_tokens = [eos, *([bos] if bos else []), *([pad] if pad else []), *extra]
        self.added_tokens_decoder: dict[int, object] = {}
        self.eos_token_id = vocab[eos]
        self.bos_token_id = vocab[bos] if bos else None
        self.pad_token_id = vocab[pad] if pad else None

    def get_vocab(self) -> dict[str, int]:
        return dict(self._vocab)

    def convert_tokens_to_ids(self, token: str) -> int | None:
        return self._vocab.get(token)


VOCAB = {"<eos>": 0, "a": 1, "b": 2, "c": 3, "<sep>": 4}


def test_a_changed_token_id_changes_it() -> None:
    swapped = dict(VOCAB, a=2, b=1)
    base, other = FakeTokenizer(VOCAB), FakeTokenizer(swapped)
    assert fingerprint(base) != fingerprint(other)
    assert describe_difference(fingerprint_parts(base), fingerprint_parts(other)) == "token-to-id map"


def test_special_tokens_and_bos_count_but_the_pad_token_does_not() -> None:
    plain = FakeTokenizer(VOCAB)
    assert fingerprint(FakeTokenizer(VOCAB, pad="c")) == fingerprint(plain)
    assert fingerprint(FakeTokenizer(VOCAB, pad="<eos>")) == fingerprint(plain)
    with_sep = FakeTokenizer(VOCAB, extra=("<sep>",))
    assert describe_difference(fingerprint_parts(plain), fingerprint_parts(with_sep)) == "special tokens"
    with_bos = FakeTokenizer(VOCAB, bos="<eos>")
    assert describe_difference(fingerprint_parts(plain), fingerprint_parts(with_bos)) == "BOS id (none vs 0)"
    # A pad token that is also another role's special token still counts as that one.
    assert fingerprint(FakeTokenizer(VOCAB, pad="<sep>", extra=("<sep>",))) == fingerprint(with_sep)


def test_fingerprint_is_16_hex_digits() -> None:
    fp = fingerprint(FakeTokenizer(VOCAB))
    assert len(fp) == 16 and int(fp, 16) >= 0
