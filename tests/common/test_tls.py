"""TLS and mTLS on eftmesh's gRPC links, with throwaway CAs (trustme)."""

from __future__ import annotations

import argparse
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
import trustme
from grpc_health.v1 import health_pb2, health_pb2_grpc

from eftmesh.combiner.server import DEFAULT_COMPOSITION, CombinerConfig
from eftmesh.combiner.server import build as build_combiner
from eftmesh.combiner.servicer import Defaults
from eftmesh.combiner.policy import UpstreamPolicy
from eftmesh import cli
from eftmesh.common import tls
from eftmesh.common.serving import Server, ServerConfig
from eftmesh.common.tls import ClientTLS, ServerTLS
from eftmesh.core.sampling import SamplingConfig
from eftmesh.logit.server import LogitConfig
from eftmesh.logit.server import build as build_logit
from eftmesh.v1 import generator_pb2, generator_pb2_grpc


class Pki:
    """A CA's files: the CA certificate, a server certificate for localhost/127.0.0.1 and a
    client certificate, each as PEM files under `root`."""

    def __init__(self, root: Path, name: str) -> None:
        self.ca = trustme.CA(organization_name=name)
        root.mkdir(parents=True, exist_ok=True)
        self.ca_pem = str(root / "ca.crt")
        self.ca.cert_pem.write_to_path(self.ca_pem)
        self.server = self._issue(root, "server", "localhost", "127.0.0.1")
        self.client = self._issue(root, "client", "combiner.eftmesh.test")

    def _issue(self, root: Path, stem: str, *names: str) -> tuple[str, str]:
        leaf = self.ca.issue_cert(*names)
        cert, key = str(root / f"{stem}.crt"), str(root / f"{stem}.key")
        leaf.private_key_pem.write_to_path(key)
        with open(cert, "wb") as f:
            for blob in leaf.cert_chain_pems:
                f.write(blob.bytes())
        return cert, key


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Pki]:
    root = tmp_path_factory.mktemp("pki")
    return {"mesh": Pki(root / "mesh", "eftmesh mesh CA"), "other": Pki(root / "other", "someone else's CA")}


def _server(server_tls: ServerTLS | None, health_port: int = -1) -> Server:
    s = Server(ServerConfig(host="127.0.0.1", port=0, grace_s=0.0, health_port=health_port, tls=server_tls), [], [])
    s.set_serving()
    s.start()
    return s


def _check(port: int, client: ClientTLS | None, server_name: str | None = None) -> grpc.StatusCode:
    with tls.channel(f"127.0.0.1:{port}", client, server_name=server_name) as ch:
        try:
            r = health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(), timeout=5)
        except grpc.RpcError as e:
            return e.code()
        assert r.status == health_pb2.HealthCheckResponse.SERVING
        return grpc.StatusCode.OK


@pytest.fixture(scope="module")
def tls_server(pki: dict[str, Pki]) -> Iterator[Server]:
    cert, key = pki["mesh"].server
    s = _server(ServerTLS(cert, key), health_port=0)
    yield s
    s.stop(0).wait()


@pytest.fixture(scope="module")
def mtls_server(pki: dict[str, Pki]) -> Iterator[Server]:
    cert, key = pki["mesh"].server
    s = _server(ServerTLS(cert, key, client_ca=pki["mesh"].ca_pem))
    yield s
    s.stop(0).wait()


@pytest.mark.e2e
def test_tls_server_accepts_a_client_trusting_its_ca(tls_server: Server, pki: dict[str, Pki]) -> None:
    assert _check(tls_server.port, ClientTLS(ca=pki["mesh"].ca_pem)) == grpc.StatusCode.OK
    # The host name checked may be set explicitly (a replica dialled by IP, a Service name).
    assert _check(tls_server.port, ClientTLS(ca=pki["mesh"].ca_pem, server_name="localhost")) == grpc.StatusCode.OK


@pytest.mark.e2e
def test_tls_server_refuses_a_plaintext_client(tls_server: Server) -> None:
    assert _check(tls_server.port, None) == grpc.StatusCode.UNAVAILABLE


@pytest.mark.e2e
def test_client_refuses_a_server_from_another_ca(tls_server: Server, pki: dict[str, Pki]) -> None:
    assert _check(tls_server.port, ClientTLS(ca=pki["other"].ca_pem)) == grpc.StatusCode.UNAVAILABLE


@pytest.mark.e2e
def test_client_refuses_a_certificate_for_another_name(tls_server: Server, pki: dict[str, Pki]) -> None:
    assert _check(tls_server.port, ClientTLS(ca=pki["mesh"].ca_pem, server_name="elsewhere.example")) == \
        grpc.StatusCode.UNAVAILABLE


@pytest.mark.e2e
def test_health_only_port_stays_plaintext(tls_server: Server) -> None:
    # kubelet gRPC probes cannot speak TLS; the health-only server answers health alone.
    assert tls_server.health_port is not None
    assert _check(tls_server.health_port, None) == grpc.StatusCode.OK


@pytest.mark.e2e
def test_mtls_server_refuses_a_client_without_a_certificate(mtls_server: Server, pki: dict[str, Pki]) -> None:
    assert _check(mtls_server.port, ClientTLS(ca=pki["mesh"].ca_pem)) == grpc.StatusCode.UNAVAILABLE
    assert _check(mtls_server.port, None) == grpc.StatusCode.UNAVAILABLE


@pytest.mark.e2e
def test_mtls_server_refuses_a_certificate_from_another_ca(mtls_server: Server, pki: dict[str, Pki]) -> None:
    cert, key = pki["other"].client
    assert _check(mtls_server.port, ClientTLS(ca=pki["mesh"].ca_pem, cert=cert, key=key)) == grpc.StatusCode.UNAVAILABLE


@pytest.mark.e2e
def test_mtls_server_accepts_a_mesh_certificate(mtls_server: Server, pki: dict[str, Pki]) -> None:
    cert, key = pki["mesh"].client
    assert _check(mtls_server.port, ClientTLS(ca=pki["mesh"].ca_pem, cert=cert, key=key)) == grpc.StatusCode.OK


@pytest.mark.e2e
def test_bad_files_are_refused_at_start(tmp_path: Path, pki: dict[str, Pki]) -> None:
    junk = tmp_path / "junk.pem"
    junk.write_text("not a certificate")
    with pytest.raises(ValueError, match="not a PEM"):
        _server(ServerTLS(str(junk), pki["mesh"].server[1]))
    with pytest.raises(ValueError, match="cannot read"):
        ClientTLS(ca=str(tmp_path / "missing.pem")).credentials()
    with pytest.raises(ValueError):
        ClientTLS(ca=pki["mesh"].ca_pem, cert=pki["mesh"].client[0])


def test_flags() -> None:
    p = argparse.ArgumentParser()
    tls.add_server_args(p, client_ca=True)
    tls.add_client_args(p, prefix="upstream")
    assert tls.server_from_args(p, p.parse_args([])) is None
    assert tls.client_from_args(p, p.parse_args([]), "upstream") is None
    a = p.parse_args(["--tls-cert", "c", "--tls-key", "k", "--tls-client-ca", "ca", "--upstream-ca", "ca",
                      "--upstream-cert", "c", "--upstream-key", "k", "--upstream-server-name", "logit"])
    assert tls.server_from_args(p, a) == ServerTLS("c", "k", "ca")
    assert tls.client_from_args(p, a, "upstream") == ClientTLS("ca", "c", "k", "logit")
    for bad in (["--tls-cert", "c"], ["--tls-client-ca", "ca"]):
        with pytest.raises(SystemExit):
            tls.server_from_args(p, p.parse_args(bad))
    with pytest.raises(SystemExit):
        tls.client_from_args(p, p.parse_args(["--upstream-cert", "c"]), "upstream")


def test_target_host() -> None:
    assert tls.target_host("logit-base:50051") == "logit-base"
    assert tls.target_host("dns:///logit-base-headless.ns:50051") == "logit-base-headless.ns"
    assert tls.target_host("k8s:///logit-base.ns:50051") == "logit-base.ns"
    assert tls.target_host("127.0.0.1:50051") is None
    assert tls.target_host("[::1]:50051") is None
    assert tls.target_host("a:1,b:2") is None


@pytest.mark.e2e
def test_combiner_over_tls_to_logit_services_over_mtls(tiny_family: dict[str, Path], pki: dict[str, Pki]) -> None:
    """The whole mesh encrypted: a client -> combiner (TLS) -> logit services (mTLS)."""
    mesh = pki["mesh"]
    cert, key = mesh.server
    logits = {}
    combiner = None
    try:
        for role, path in tiny_family.items():
            cfg = LogitConfig(model=str(path), role=role, server=ServerConfig(
                host="127.0.0.1", port=0, grace_s=0.0, health_port=-1, tls=ServerTLS(cert, key, mesh.ca_pem)))
            logits[role] = build_logit(cfg)
            logits[role].start()
        ccert, ckey = mesh.client
        cfg = CombinerConfig(
            upstreams={r: f"127.0.0.1:{ls.server.port}" for r, ls in logits.items()},
            tokenizer=str(tiny_family["base-small"]),
            defaults=Defaults(DEFAULT_COMPOSITION, SamplingConfig(temperature=1.0, top_p=1.0), 16, 64),
            server=ServerConfig(host="127.0.0.1", port=0, grace_s=0.0, health_port=-1, tls=ServerTLS(cert, key)),
            policy=UpstreamPolicy(connect_timeout_s=30.0, tls=ClientTLS(ca=mesh.ca_pem, cert=ccert, key=ckey)),
        )
        combiner = build_combiner(cfg)
        combiner.start()
        assert combiner.wait_serving(30), "the combiner never reached its mTLS upstreams"
        with tls.channel(f"127.0.0.1:{combiner.server.port}", ClientTLS(ca=mesh.ca_pem)) as ch:
            r = generator_pb2_grpc.GeneratorStub(ch).Complete(
                generator_pb2.CompleteRequest(prompt="hello", max_new_tokens=4, seed=1), timeout=60)
        assert r.usage.completion_tokens > 0
        # The CLI as a TLS client.
        address = f"--address=127.0.0.1:{combiner.server.port}"
        with pytest.raises(SystemExit) as done:
            cli.main(["info", address, f"--tls-ca={mesh.ca_pem}"])
        assert done.value.code == 0
        with pytest.raises(SystemExit) as done:
            cli.main(["info", address, f"--tls-ca={pki['other'].ca_pem}", "--timeout=3"])
        assert done.value.code == 1
        # A plaintext client gets nowhere near the combiner's API.
        with grpc.insecure_channel(f"127.0.0.1:{combiner.server.port}") as ch:
            with pytest.raises(grpc.RpcError) as e:
                generator_pb2_grpc.GeneratorStub(ch).Complete(generator_pb2.CompleteRequest(prompt="hello"), timeout=5)
        assert e.value.code() == grpc.StatusCode.UNAVAILABLE
    finally:
        if combiner is not None:
            combiner.stop(0)
        for ls in logits.values():
            ls.server.stop(0).wait()
