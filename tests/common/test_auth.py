"""Bearer tokens on the Generator API: refusals, rotation, and tokens kept out of the logs."""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from eftmesh.combiner.server import CombinerServer
from eftmesh import cli
from eftmesh.common import auth
from eftmesh.v1 import generator_pb2, generator_pb2_grpc

from tests.conftest import Mesh, start_combiner

OLD = "old-token-3c1f0e9a7b"
NEW = "new-token-88d2b4f1c6"


class Clock:
    def __init__(self) -> None:
        self.t = 0.0

    def __call__(self) -> float:
        return self.t


def _write(path: Path, *lines: str) -> None:
    path.write_text("".join(f"{line}\n" for line in lines))
    # Make the change visible even within one mtime tick.
    st = path.stat()
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000_000))


def test_token_file_reads_rotates_and_keeps_the_last_good_set(tmp_path: Path) -> None:
    f = tmp_path / "tokens"
    _write(f, "# comment", "", f"  {OLD}  ")
    clock = Clock()
    tokens = auth.TokenFile(str(f), check_interval_s=2.0, clock=clock)
    assert tokens.accepts(OLD.encode()) and not tokens.accepts(NEW.encode())
    _write(f, OLD, NEW)  # both during the rotation
    assert not tokens.accepts(NEW.encode())  # not looked at again before the interval
    clock.t = 2.5
    assert tokens.accepts(OLD.encode()) and tokens.accepts(NEW.encode())
    _write(f, NEW)
    clock.t = 5.0
    assert tokens.accepts(NEW.encode()) and not tokens.accepts(OLD.encode())
    _write(f, "")  # a half-written or emptied file locks nobody out
    clock.t = 7.5
    assert tokens.accepts(NEW.encode())
    f.unlink()
    clock.t = 10.0
    assert tokens.accepts(NEW.encode())
    assert not tokens.accepts(b"") and not tokens.accepts(NEW.encode()[:-1])


def test_token_file_must_hold_a_token(tmp_path: Path) -> None:
    f = tmp_path / "tokens"
    _write(f, "# nothing yet")
    with pytest.raises(ValueError, match="no token"):
        auth.TokenFile(str(f))
    with pytest.raises(FileNotFoundError):
        auth.TokenFile(str(tmp_path / "missing"))


@pytest.fixture()
def guarded(mesh: Mesh, tiny_family: dict[str, Path], tmp_path: Path,
            caplog: pytest.LogCaptureFixture) -> Iterator[tuple[CombinerServer, Path]]:
    """A combiner requiring tokens from a file, over the session mesh's logit services."""
    caplog.set_level(logging.DEBUG)
    f = tmp_path / "tokens"
    _write(f, OLD)
    cs = start_combiner(tiny_family["base-small"], {r: ls.server.port for r, ls in mesh.logits.items()},
                        auth_tokens_file=str(f))
    assert cs.wait_serving(30)
    yield cs, f
    cs.stop(0)


def _complete(port: int, token: str | None, raw: str | None = None) -> grpc.StatusCode:
    metadata = [("authorization", raw)] if raw is not None else auth.client_metadata(token)
    with grpc.insecure_channel(f"127.0.0.1:{port}") as ch:
        try:
            generator_pb2_grpc.GeneratorStub(ch).Complete(
                generator_pb2.CompleteRequest(prompt="hi", max_new_tokens=2, seed=1), timeout=30, metadata=metadata)
        except grpc.RpcError as e:
            assert OLD not in (e.details() or "") and NEW not in (e.details() or "")
            return e.code()
    return grpc.StatusCode.OK


def _health(port: int) -> int:
    with grpc.insecure_channel(f"127.0.0.1:{port}") as ch:
        return health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(), timeout=5).status


@pytest.mark.slow
@pytest.mark.e2e
def test_generator_api_needs_a_token(guarded: tuple[CombinerServer, Path], caplog: pytest.LogCaptureFixture,
                                     monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("EFTMESH_TOKEN", raising=False)
    cs, f = guarded
    port = cs.server.port
    assert _complete(port, None) == grpc.StatusCode.UNAUTHENTICATED
    assert _complete(port, None, raw=f"Basic {OLD}") == grpc.StatusCode.UNAUTHENTICATED
    assert _complete(port, None, raw="Bearer ") == grpc.StatusCode.UNAUTHENTICATED
    assert _complete(port, NEW) == grpc.StatusCode.PERMISSION_DENIED
    assert _complete(port, OLD) == grpc.StatusCode.OK
    assert _complete(port, None, raw=f"bearer {OLD}") == grpc.StatusCode.OK  # the scheme is case-insensitive
    # Every method of the Generator service, streaming included.
    with grpc.insecure_channel(f"127.0.0.1:{port}") as ch:
        stub = generator_pb2_grpc.GeneratorStub(ch)
        with pytest.raises(grpc.RpcError) as e:
            stub.Info(generator_pb2.GeneratorInfoRequest(), timeout=10)
        assert e.value.code() == grpc.StatusCode.UNAUTHENTICATED
        with pytest.raises(grpc.RpcError) as e:
            list(stub.Generate(generator_pb2.GenerateRequest(prompt="hi", max_new_tokens=2), timeout=10,
                               metadata=auth.client_metadata(NEW)))
        assert e.value.code() == grpc.StatusCode.PERMISSION_DENIED
        # An unauthenticated caller's bytes are not even parsed.
        junk = ch.unary_unary("/eftmesh.v1.Generator/Complete", request_serializer=None, response_deserializer=None)
        with pytest.raises(grpc.RpcError) as e:
            junk(b"\xff\xff\xff", timeout=10)
        assert e.value.code() == grpc.StatusCode.UNAUTHENTICATED
    # Health stays open, on both ports.
    assert _health(port) == health_pb2.HealthCheckResponse.SERVING
    assert cs.server.health_port is not None and _health(cs.server.health_port) == health_pb2.HealthCheckResponse.SERVING

    # The CLI sends the token from a file (or --token / $EFTMESH_TOKEN).
    token_file = f.parent / "client-token"
    token_file.write_text(OLD + "\n")
    for extra, code in (([], 1), ([f"--token-file={token_file}"], 0), ([f"--token={NEW}"], 1)):
        with pytest.raises(SystemExit) as done:
            cli.main(["info", f"--address=127.0.0.1:{port}", "--timeout=10", *extra])
        assert done.value.code == code, extra

    # Rotation: both tokens for a while, then the new one alone, without a restart.
    _write(f, OLD, NEW)
    deadline = time.monotonic() + 10
    while _complete(port, NEW) != grpc.StatusCode.OK:
        assert time.monotonic() < deadline, "the new token was never accepted"
        time.sleep(0.5)
    assert _complete(port, OLD) == grpc.StatusCode.OK
    _write(f, NEW)
    deadline = time.monotonic() + 10
    while _complete(port, OLD) != grpc.StatusCode.PERMISSION_DENIED:
        assert time.monotonic() < deadline, "the old token was never retired"
        time.sleep(0.5)
    assert _complete(port, NEW) == grpc.StatusCode.OK

    # The tokens never reach the logs.
    assert "token" in caplog.text  # the log did speak of the token file...
    assert OLD not in caplog.text and NEW not in caplog.text  # ...but never of a token
