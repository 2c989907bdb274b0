"""The Generator converter (protobuf <-> domain) without a server: each rule lives in one domain
type and reaches the client as INVALID_ARGUMENT through `invalid_argument()`; k and max_k mean
one thing each; chat fields get their defaults."""

from __future__ import annotations

import pytest

from eftmesh.combiner import convert
from eftmesh.combiner.convert import Defaults, SpeculationDefaults
from eftmesh.common.convert import invalid_argument
from eftmesh.common.errors import InvalidArgument, NotFound
from eftmesh.core.mixing import Composition, Delta
from eftmesh.core.sampling import SamplingConfig
from eftmesh.logit import convert as logit_convert
from eftmesh.v1 import generator_pb2 as pb
from eftmesh.v1 import logit_pb2

ROLES = {"base-large": 1, "base-small": 1, "ft-small": 1}
DEFAULTS = Defaults(Composition("base-large", (Delta("ft-small", "base-small", 1.0),)), SamplingConfig(),
                    max_new_tokens=16, max_new_tokens_cap=64, speculation=SpeculationDefaults("adaptive", 4, 16))


def req(**fields) -> pb.GenerateRequest:
    fields.setdefault("prompt", "Hi")
    return pb.GenerateRequest(**fields)


def test_a_domain_rule_becomes_invalid_argument_once() -> None:
    with pytest.raises(InvalidArgument, match="boom"):
        with invalid_argument():
            raise ValueError("boom")
    with pytest.raises(NotFound):  # other statuses pass through untouched
        with invalid_argument():
            raise NotFound("x")


@pytest.mark.parametrize("fields,fragment", [
    (dict(sampling={"temperature": -1}), "sampling.temperature must be"),
    (dict(sampling={"top_p": 0}), "sampling.top_p must be in (0, 1]"),
    (dict(sampling={"top_k": -2}), "sampling.top_k must be >= 0"),
    (dict(composition={"base": "base-large", "deltas": [{"tuned": "ft-small", "reference": "base-small",
                                                         "weight": float("nan")}]}), "composition.deltas[0].weight"),
    (dict(composition={"deltas": [{"tuned": "ft-small", "reference": "base-small"}]}), "composition.base is empty"),
    (dict(composition={"base": "x" * 200}), "composition.base is 200 bytes"),
    (dict(max_new_tokens=0), "max_new_tokens must be >= 1"),
    (dict(max_new_tokens=65), "max_new_tokens must be in [1, 64]"),
    (dict(stop=["a"] * 17), "stop has 17 strings"),
    (dict(prompt=""), "prompt is empty"),
    (dict(messages=[{"role": "user", "content": "x"}]), "both prompt and messages"),
    (dict(prompt="", messages=[{"role": "", "content": "x"}]), "role is empty"),
    (dict(speculation={"mode": pb.SPECULATION_MODE_FIXED, "k": 17}), "speculation.k must be in [1, 16]"),
    (dict(speculation={"mode": pb.SPECULATION_MODE_ADAPTIVE, "max_k": 17}), "speculation.max_k must be in [1, 16]"),
    (dict(speculation={"mode": 9}), "not a known SpeculationMode"),
], ids=lambda v: v if isinstance(v, str) else None)
def test_each_rule_names_its_field(fields, fragment) -> None:
    with pytest.raises(InvalidArgument) as e:
        convert.request_from_pb(req(**fields), DEFAULTS, ROLES)
    assert fragment in str(e.value)


def test_k_is_fixed_modes_block_and_max_k_adaptives_cap() -> None:
    def spec(**s):
        return convert.request_from_pb(req(speculation=s), DEFAULTS, ROLES).speculation

    assert (spec(mode=pb.SPECULATION_MODE_FIXED, k=3, max_k=9).k, spec(mode=pb.SPECULATION_MODE_FIXED).k) == (3, 4)
    adaptive = spec(mode=pb.SPECULATION_MODE_ADAPTIVE, k=3, max_k=9)
    assert adaptive.adaptive and adaptive.k == 9  # k is ignored in adaptive mode
    assert spec(mode=pb.SPECULATION_MODE_ADAPTIVE).k == 16 and spec().k == 16  # the combiner's --max-k
    assert spec(mode=pb.SPECULATION_MODE_OFF) is None
    assert convert.speculation_to_pb(DEFAULTS.speculation) == pb.Speculation(mode=pb.SPECULATION_MODE_ADAPTIVE, k=4, max_k=16)


def test_chat_fields_get_their_defaults_and_unknown_roles_are_not_found() -> None:
    chat = [{"role": "user", "content": "Hi"}]
    r = convert.request_from_pb(req(prompt="", messages=chat), DEFAULTS, ROLES)
    assert r.chat_template_role == "ft-small" and r.messages[0].content == "Hi" and r.prompt == ""
    plain = convert.request_from_pb(req(prompt="", messages=chat, composition={"base": "base-small"}), DEFAULTS, ROLES)
    assert plain.chat_template_role == "base-small"  # no delta: the base renders
    with pytest.raises(NotFound, match="nope"):
        convert.request_from_pb(req(prompt="", messages=chat, chat_template_role="nope"), DEFAULTS, ROLES)
    assert convert.request_from_pb(req(), DEFAULTS, ROLES).chat_template_role == ""


def test_a_malformed_draft_item_fails_alone() -> None:
    items = [logit_pb2.DraftItem(session_id="a", tokens=[1], k=2, sampling={"top_p": 2.0}),
             logit_pb2.DraftItem(session_id="b", tokens=[1], k=2)]
    good, where, bad = logit_convert.draft_items_from_pb(items)
    assert where == [1] and [g.session_id for g in good] == ["b"]
    assert list(bad) == [0] and "sampling.top_p" in str(bad[0])


def test_the_combiners_threads_size_the_kernels_pool_and_torch_keeps_one(tiny_family, monkeypatch) -> None:
    """--threads (default auto: the CPUs the process may use, at most the cap; tests/common/
    test_cpus.py) is how many threads the compiled kernels share each step's rows among; torch
    keeps one intra-op thread, whatever it is (idle OpenMP threads spin: at one stream they
    made the combiner's work per token up to 6x as long)."""
    import torch

    from eftmesh.combiner.server import build, parse_args
    from eftmesh.common import cpus
    from eftmesh.core import fusedrows

    monkeypatch.setattr(cpus, "usable_cpus", lambda: 3)
    base = ["--upstream", "base-large=h:1", "--no-default-delta", "--tokenizer", str(tiny_family["base-small"]),
            "--host", "127.0.0.1", "--port", "0", "--health-port", "off"]
    assert parse_args([*base, "--threads", "1"]).threads == 1
    cfg = parse_args(base)
    assert cfg.threads == 3
    pools: list[int] = []
    monkeypatch.setattr(fusedrows, "set_threads", pools.append)
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        cs = build(cfg)  # (bound, not started: no upstream is reached)
        assert pools == [3] and torch.get_num_threads() == 1
        cs.stop(0)
    finally:
        torch.set_num_threads(before)


def test_the_combiners_default_sampling_is_what_the_wire_carries(tiny_family) -> None:
    """--temperature and --top-p become the float32 values a request's SamplingParams carry (and
    a drafting logit service receives): a generation that takes the defaults verifies with the
    numbers its drafter cut its rows with, so the drafter's cuts are reused (speculative.py)."""
    import numpy as np

    from eftmesh.combiner.server import parse_args

    base = ["--upstream", "base-large=h:1", "--no-default-delta", "--tokenizer", str(tiny_family["base-small"]),
            "--host", "127.0.0.1", "--port", "0", "--health-port", "off"]
    got = parse_args([*base, "--temperature", "0.7", "--top-p", "0.95", "--top-k", "5"]).defaults.sampling
    assert (got.temperature, got.top_p, got.top_k) == (float(np.float32(0.7)), float(np.float32(0.95)), 5)
    assert got.temperature != 0.7 and got.top_p != 0.95  # (not float32 numbers: rounded)
    assert parse_args(base).defaults.sampling.top_p == float(np.float32(0.95))  # (the default too)


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
@pytest.mark.parametrize("floored", [True, False])
def test_half_precision_rows_reach_the_mix_floored_bf16_as_sent(floored, dtype) -> None:
    """A ScoreBatch answer's half-precision rows (a GPU model's): floored bfloat16 rows stay as
    the wire brings them (the mix widens them as it reads them, `fusedmix.mix3`); float16 rows,
    and an older service's unfloored rows, become float32 as the answer is read (upstream.
    _outcomes, in the thread that waited for it), exactly, and are floored; the wire's bytes
    are never written."""
    import math

    import torch

    from eftmesh.combiner.upstream import _outcomes
    from eftmesh.common import rowswire, tensors
    from eftmesh.core.mixing import LOGPROB_FLOOR, floor_rows_

    rows = (torch.randn(3, 40, generator=torch.Generator().manual_seed(2)) * 5).to(getattr(torch, dtype))
    rows[1, 7] = -math.inf  # (a half-precision model's impossible token)
    resp = logit_pb2.ScoreBatchResponse(logits=tensors.to_pb(rows, rows.dtype), floored=floored,
                                        results=[logit_pb2.ItemResult(rows=2), logit_pb2.ItemResult(rows=1)])
    wire = bytes(resp.logits.data)
    got = _outcomes("ft-small", rowswire.as_answer(resp))
    kept = floored and dtype == "bfloat16"
    assert [o.rows.dtype for o in got] == [rows.dtype if kept else torch.float32] * 2 and [o.rows.shape[0] for o in got] == [2, 1]
    want = rows if kept else rows.float() if floored else floor_rows_(rows.float())
    assert torch.equal(torch.cat([o.rows for o in got]), want)
    assert bytes(resp.logits.data) == wire
    assert floored or float(got[0].rows[1, 7]) >= float(rows[1].float().amax()) + LOGPROB_FLOOR


def test_a_batched_answers_items_get_their_own_rows_drafts_and_errors() -> None:
    """`upstream._outcomes` over a response mixing OK items (rows 1 and 2, one with drafts),
    an item error and a draining refusal: each OK item gets its own rows, in order; and a
    response whose row counts do not add up to its tensor is read item by item as before."""
    import torch

    from eftmesh.combiner.upstream import ReplicaDraining, _outcomes
    from eftmesh.common import rowswire, tensors
    from eftmesh.common.errors import DRAINING_PREFIX, NotFound

    rows = torch.arange(4 * 6, dtype=torch.float32).view(4, 6)
    results = [logit_pb2.ItemResult(rows=1, cached_tokens=3),
               logit_pb2.ItemResult(code=5, message="no session s1"),  # NOT_FOUND
               logit_pb2.ItemResult(rows=2, drafts=[7, 8], draft_probs=[0.5, 0.25], draft_cut_z=[-1.5, -0.25],
                                    draft_cut_mass=[3.25, 1.125]),
               logit_pb2.ItemResult(code=14, message=f"{DRAINING_PREFIX} replica r"),  # UNAVAILABLE
               logit_pb2.ItemResult(rows=1)]
    resp = logit_pb2.ScoreBatchResponse(logits=tensors.to_pb(rows), floored=True, results=results)
    got = _outcomes("base-large", rowswire.deserializer(logit_pb2.ScoreBatchResponse)(resp.SerializeToString()))
    assert torch.equal(got[0].rows, rows[0:1]) and got[0].cached_tokens == 3 and got[0].drafts == []
    assert isinstance(got[1].error, NotFound) and got[1].rows is None
    assert torch.equal(got[2].rows, rows[1:3]) and got[2].drafts == [7, 8] and got[2].draft_probs == [0.5, 0.25]
    assert got[2].draft_cuts == [(-1.5, 3.25), (-0.25, 1.125)] and got[0].draft_cuts == []
    assert isinstance(got[3].error, ReplicaDraining)
    assert torch.equal(got[4].rows, rows[3:4])
    short = logit_pb2.ScoreBatchResponse(logits=tensors.to_pb(rows), floored=True,
                                         results=[logit_pb2.ItemResult(rows=1), logit_pb2.ItemResult(rows=2)])
    got = _outcomes("base-large", rowswire.as_answer(short))
    assert torch.equal(got[0].rows, rows[0:1]) and torch.equal(got[1].rows, rows[1:3])
