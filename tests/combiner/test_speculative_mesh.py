"""Speculative EFT end to end: lossless against plain EFT.

Greedy: identical output token for token, for several compositions, k in {1, 2, 4, 8} and
adaptive, with a stop string and max_new_tokens falling inside a block. Sampling: a
chi-square test over a six-token vocabulary that the first two tokens of speculative
generations follow the exact plain-EFT joint distribution.
"""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from eftmesh.combiner.decoding import GenerationRequest, SpeculationConfig
from eftmesh.combiner.decoder import Decoder
from eftmesh.inprocess import LocalScorer
from eftmesh.core.mixing import Composition, Delta
from eftmesh.core.sampling import SamplingConfig
from eftmesh.tiny import make_model
from eftmesh.logit.engine import ModelEngine
from eftmesh.v1 import generator_pb2

pytestmark = [pytest.mark.slow, pytest.mark.e2e]

PROMPT = "The quick brown fox"
D = generator_pb2.Delta
COMPOSITIONS = {
    "upscale": generator_pb2.Composition(base="base-large", deltas=[D(tuned="ft-small", reference="base-small", weight=1.0)]),
    # the draft role is the base itself: ft-small + 1.5 * (base-large - base-small)
    "amplified": generator_pb2.Composition(base="ft-small", deltas=[D(tuned="base-large", reference="base-small", weight=1.5)]),
    "two-deltas": generator_pb2.Composition(
        base="base-large",
        deltas=[D(tuned="ft-small", reference="base-small", weight=0.75), D(tuned="base-small", reference="base-large", weight=0.25)],
    ),
}
MODES = {
    "k1": {"mode": generator_pb2.SPECULATION_MODE_FIXED, "k": 1},
    "k2": {"mode": generator_pb2.SPECULATION_MODE_FIXED, "k": 2},
    "k4": {"mode": generator_pb2.SPECULATION_MODE_FIXED, "k": 4},
    "k8": {"mode": generator_pb2.SPECULATION_MODE_FIXED, "k": 8},
    "adaptive": {"mode": generator_pb2.SPECULATION_MODE_ADAPTIVE},
}
OFF = {"mode": generator_pb2.SPECULATION_MODE_OFF}


def complete(mesh, composition, speculation, **kw):
    req = dict(prompt=PROMPT, composition=composition, sampling={"temperature": 0.0}, max_new_tokens=16, speculation=speculation, logprobs=True)
    req.update(kw)
    return mesh.generator.Complete(generator_pb2.CompleteRequest(**req))


@pytest.mark.parametrize("comp", list(COMPOSITIONS))
@pytest.mark.parametrize("mode", list(MODES))
def test_greedy_speculative_equals_greedy_plain(mesh, comp, mode):
    plain = complete(mesh, COMPOSITIONS[comp], OFF)
    spec = complete(mesh, COMPOSITIONS[comp], MODES[mode])
    assert list(spec.token_ids) == list(plain.token_ids)
    assert spec.text == plain.text
    assert spec.finish_reason == plain.finish_reason
    assert max(abs(a - b) for a, b in zip(spec.logprobs, plain.logprobs)) <= 1e-4
    s = spec.speculation
    assert s.draft_role == ("ft-small" if comp != "amplified" else "base-large")
    assert s.blocks > 0 and s.drafted_tokens >= s.accepted_tokens
    assert s.acceptance_rate == pytest.approx(s.accepted_tokens / s.drafted_tokens)
    # one base-role call per block, plus at most one plain step when a single token is left;
    # adaptive mode may also take plain steps when the load controller caps k at 0
    base_calls = round(s.base_calls_per_token * len(spec.token_ids))
    if mode == "adaptive":
        assert base_calls >= s.blocks
    else:
        assert base_calls in (s.blocks, s.blocks + 1)


def test_plain_decoding_reports_one_base_call_per_token(mesh):
    plain = complete(mesh, COMPOSITIONS["upscale"], OFF)
    assert plain.speculation.blocks == plain.speculation.drafted_tokens == 0
    assert plain.speculation.base_calls_per_token == pytest.approx(1.0)


def test_a_draft_role_outside_the_composition_is_plain_speculative_decoding(mesh):
    base_only = generator_pb2.Composition(base="base-large")
    plain = complete(mesh, base_only, OFF)
    spec = complete(mesh, base_only, {"mode": generator_pb2.SPECULATION_MODE_FIXED, "k": 4, "draft_role": "ft-small"})
    assert list(spec.token_ids) == list(plain.token_ids)
    assert spec.speculation.draft_role == "ft-small"


@pytest.mark.parametrize("mode", ["k4", "k8", "adaptive"])
def test_a_stop_string_inside_a_block(mesh, mode):
    plain = complete(mesh, COMPOSITIONS["upscale"], OFF)
    text = plain.text
    assert len(text) > 8
    stop = text[5:8]
    cut_plain = complete(mesh, COMPOSITIONS["upscale"], OFF, stop=[stop])
    cut_spec = complete(mesh, COMPOSITIONS["upscale"], MODES[mode], stop=[stop])
    assert cut_plain.finish_reason == cut_spec.finish_reason == generator_pb2.FINISH_REASON_STOP
    assert cut_spec.text == cut_plain.text == text[: text.find(stop)]
    assert list(cut_spec.token_ids) == list(cut_plain.token_ids)


@pytest.mark.parametrize("n", [1, 2, 5, 9])
def test_max_new_tokens_inside_a_block(mesh, n):
    plain = complete(mesh, COMPOSITIONS["upscale"], OFF, max_new_tokens=n)
    spec = complete(mesh, COMPOSITIONS["upscale"], MODES["k8"], max_new_tokens=n)
    assert list(spec.token_ids) == list(plain.token_ids)
    assert len(spec.token_ids) == n or spec.finish_reason == generator_pb2.FINISH_REASON_EOS


def test_streamed_speculative_chunks_concatenate_to_the_text(mesh):
    req = generator_pb2.GenerateRequest(prompt=PROMPT, sampling={"temperature": 1.0}, seed=9, max_new_tokens=30, speculation=MODES["k4"])
    chunks = list(mesh.generator.Generate(req))
    full = mesh.generator.Complete(generator_pb2.CompleteRequest(prompt=PROMPT, sampling={"temperature": 1.0}, seed=9, max_new_tokens=30, speculation=MODES["k4"]))
    assert "".join(c.text for c in chunks) == full.text
    assert [t for c in chunks for t in c.token_ids] == list(full.token_ids)
    assert chunks[-1].speculation.blocks == full.speculation.blocks == len(chunks)


def test_seeded_speculative_sampling_is_reproducible(mesh):
    def run(seed):
        return list(complete(mesh, COMPOSITIONS["upscale"], MODES["adaptive"], sampling={"temperature": 1.0}, seed=seed).token_ids)

    assert run(4) == run(4)
    assert run(4) != run(5)


# --- statistical test over a six-token vocabulary -------------------------------------------

WORDS = ["<|endoftext|>", "a", "b", "c", "d", "e"]
CHI2_CRIT_001 = {10: 29.588, 15: 37.697, 20: 45.315, 25: 52.620, 30: 59.703, 35: 66.619}


@pytest.fixture(scope="module")
def six_token_family(tmp_path_factory):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    root = tmp_path_factory.mktemp("six")
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(WORDS)}, unk_token="<|endoftext|>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", bos_token="<|endoftext|>")
    fast.save_pretrained(str(root / "tokenizer"))
    paths = {}
    for role, (layers, width, seed) in {"base-large": (2, 32, 1), "base-small": (1, 16, 2), "ft-small": (1, 16, 3)}.items():
        make_model(root / role, root / "tokenizer", layers, width, 2, seed, n_positions=16, logit_std=0.5)
        paths[role] = root / role
    return paths


def test_speculative_sampling_follows_the_plain_eft_distribution(six_token_family, monkeypatch):
    """Sampled speculation over real engines follows the plain EFT distribution (chi-square),
    with the drafter's own q(x) (ItemResult.draft_probs) in every verification."""
    from eftmesh.combiner import batchmix
    from eftmesh.core import speculative

    carried = []

    def spy(real):
        def verify_blocks(p, blocks, cfg, *rest, **kw):
            carried.extend(b.q_probs is not None and len(b.q_probs) == len(b.drafts) for b in blocks)
            return real(p, blocks, cfg, *rest, **kw)
        return verify_blocks

    monkeypatch.setattr(batchmix, "verify_blocks", spy(batchmix.verify_blocks))
    monkeypatch.setattr(speculative, "verify_blocks", spy(speculative.verify_blocks))
    torch.set_num_threads(1)
    engines = {r: ModelEngine.from_pretrained(str(p), role=r) for r, p in six_token_family.items()}
    tok = AutoTokenizer.from_pretrained(str(six_token_family["base-small"]))
    V = len(tok)
    decoder = Decoder(LocalScorer(engines), tok, V)
    comp = Composition("base-large", (Delta("ft-small", "base-small", 1.0),))
    sampling = SamplingConfig(temperature=1.0)
    prompt = "a b"

    # The exact plain-EFT joint distribution of the first two tokens, from transformers.
    models = {r: AutoModelForCausalLM.from_pretrained(str(p)).eval() for r, p in six_token_family.items()}
    coef = comp.coefficients()

    def eft(ids):
        x = torch.tensor([ids])
        with torch.no_grad():
            acc = sum(c * torch.log_softmax(models[r](x).logits[0, -1, :V], -1) for r, c in coef.items())
        return torch.softmax(acc, -1)

    ids = tok.encode(prompt)
    p1 = eft(ids)
    joint = {}
    for t1 in range(V):
        if t1 == tok.eos_token_id:
            joint[(t1,)] = float(p1[t1])
            continue
        p2 = eft(ids + [t1])
        for t2 in range(V):
            joint[(t1, t2)] = float(p1[t1] * p2[t2])

    n = 2000
    counts = dict.fromkeys(joint, 0)
    spec = SpeculationConfig(draft_role="ft-small", k=2, adaptive=False)
    for seed in range(n):
        req = GenerationRequest(prompt, comp, sampling, seed=seed, max_new_tokens=3, speculation=spec)
        out = [t for c in decoder.generate(req) for t in c.token_ids]
        key = (out[0],) if out[0] == tok.eos_token_id else tuple(out[:2])
        counts[key] += 1

    # Pool cells expected to hold fewer than 5 draws, so the chi-square approximation holds.
    cells = sorted(joint, key=joint.get)
    obs, exp, pool_o, pool_e = [], [], 0.0, 0.0
    for c in cells:
        e = joint[c] * n
        if e < 5:
            pool_o, pool_e = pool_o + counts[c], pool_e + e
        else:
            obs.append(counts[c])
            exp.append(e)
    if pool_e > 0:
        obs.append(pool_o)
        exp.append(pool_e)
    stat = sum((o - e) ** 2 / e for o, e in zip(obs, exp))
    df = len(obs) - 1
    crit = CHI2_CRIT_001[max(d for d in CHI2_CRIT_001 if d <= df)]  # conservative: a smaller df's value
    assert df >= 10, f"too few cells ({df + 1}) for a meaningful test"
    print(f"chi-square {stat:.1f} over {df} df, critical value {crit}")
    assert stat < crit, f"chi-square {stat:.1f} over {df} df exceeds {crit} (significance 0.001)"
    assert len(carried) >= n and all(carried), "every verified block brought its drafter's q(x)"
