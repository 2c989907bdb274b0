"""The pure parts of `make bench-vocab`: the synthetic 128k tokenizer, the counters' arithmetic."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from eftmesh_lab.bench_vocab import (
    RANDOM_VOCAB,
    counter_by_role,
    make_synthetic_tokenizer,
    median_round,
    random_llama_config,
    summarise,
    synthetic_prompts,
    synthetic_vocab,
    times_delta,
)
from eftmesh.combiner.scheduler import StepTimes
from eftmesh.common.tokenizer import fingerprint


def test_synthetic_tokenizer_has_128256_tokens_and_a_stable_fingerprint() -> None:
    a, b = make_synthetic_tokenizer(), make_synthetic_tokenizer()
    assert len(a) == RANDOM_VOCAB == 128_256
    assert fingerprint(a) == fingerprint(b)
    assert (a.unk_token_id, a.bos_token_id, a.eos_token_id, a.pad_token_id) == (0, 1, 2, 3)
    ids = a.encode(synthetic_prompts(3)[2])
    assert len(ids) == 6 and all(4 <= i < RANDOM_VOCAB for i in ids)
    assert a.encode("w5 w128255 nope") == [5, 128255, 0]
    # the random model's output layer covers the tokenizer, and ids match the config's specials
    cfg = random_llama_config()
    assert cfg.vocab_size == len(a) and (cfg.bos_token_id, cfg.eos_token_id) == (a.bos_token_id, a.eos_token_id)


def test_synthetic_vocab_and_prompts() -> None:
    v = synthetic_vocab(10)
    assert list(v.values()) == list(range(10)) and v["w9"] == 9
    with pytest.raises(ValueError):
        synthetic_vocab(4)
    prompts = synthetic_prompts(16)
    assert len(set(prompts)) == 16 and prompts == synthetic_prompts(16)


def test_summarise_rates_and_bytes() -> None:
    before = StepTimes(steps=2, tokens=5, rows=5, draft_s=0.5, score_s=1.0, combine_s=0.1)
    after = StepTimes(steps=12, tokens=25, rows=25, draft_s=0.5, score_s=2.0, combine_s=0.3)
    d = times_delta(after, before)
    assert d == StepTimes(steps=10, tokens=20, rows=20, draft_s=0.0, score_s=1.0, combine_s=pytest.approx(0.2))
    s = summarise(d, {"base-large": 20 * 1000 * 4}, completion_tokens=20, wall_s=2.0, vocab=1000, dtype_bytes=4)
    assert s["tokens_per_s"] == 10.0 and s["tokens_per_step"] == 2.0
    assert s["combine_ms_per_token"] == pytest.approx(10.0) and s["score_ms_per_step"] == pytest.approx(100.0)
    assert s["upstream_wait_ms_per_step"] == pytest.approx(100.0)
    assert s["bytes_per_row_by_role"]["base-large"] == s["theoretical_bytes_per_row"] == 4000
    assert s["kib_per_token_by_role"]["base-large"] == pytest.approx(4000 / 1024)
    assert median_round([{"tokens_per_s": 3.0}, {"tokens_per_s": 1.0}, {"tokens_per_s": 2.0}]) == {"tokens_per_s": 2.0}


def test_counter_by_role_reads_an_sdk_snapshot() -> None:
    point = lambda role, v: SimpleNamespace(attributes={"eftmesh.role": role}, value=v)  # noqa: E731
    metric = lambda name, points: SimpleNamespace(name=name, data=SimpleNamespace(data_points=points))  # noqa: E731
    data = SimpleNamespace(resource_metrics=[SimpleNamespace(scope_metrics=[SimpleNamespace(metrics=[
        metric("eftmesh.upstream.received", [point("base-large", 10), point("ft-small", 7)]),
        metric("eftmesh.tokens", [point("base-large", 99)]),
    ])])])
    assert counter_by_role(data) == {"base-large": 10, "ft-small": 7}
    assert counter_by_role(None) == {}


def test_sampling_settings_are_parsed_checked_and_tabled() -> None:
    from eftmesh_lab.bench_vocab import SAMPLINGS, markdown, parse_args

    a = parse_args(["--sampling", "sampled", "--modes", "plain"])
    assert a.samplings == ["sampled"] and SAMPLINGS["sampled"] == {"temperature": 0.6, "top_p": 0.9}
    assert parse_args([]).samplings == ["greedy", "sampled"]
    with pytest.raises(SystemExit):
        parse_args(["--sampling", "nucleus"])
    m = summarise(StepTimes(steps=4, tokens=4, rows=4, combine_s=0.004), {"base-large": 400}, 4, 1.0, 100, 4)
    table = markdown({"sets": [{"name": "smollm2", "vocab": 49_152, "dtype": "float32", "results": [
        {"sampling": "sampled", "mode": "plain", "n": 16, "median": m}]}]})
    row = table.splitlines()[2]
    assert row.startswith("| smollm2 (49,152, float32) | sampled | plain | 16 | 4.0 | 1.00 |"), row
    assert table.splitlines()[1].count("|---") == table.splitlines()[0].count("|") - 1
