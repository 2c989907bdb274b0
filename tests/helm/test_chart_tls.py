"""The chart's TLS, mTLS and bearer-token values: Secrets mounted, flags wired, cert-manager."""

from __future__ import annotations

import helm_python
import pytest

from tests.helm.test_chart import by_kind, container, parse, pod_spec, render

TLS = {"tls": {"enabled": True}}
CERT_MANAGER = {"tls": {"enabled": True, "certManager": {"enabled": True, "issuerRef": {"name": "mesh-ca"},
                                                         "combinerDnsNames": ["eft.example.com"]}}}
AUTH = {"auth": {"enabled": True, "existingSecret": "eft-tokens"}}


def test_tls_and_tokens_should_be_off_by_default():
    docs = render()
    for dep in by_kind(docs, "Deployment").values():
        args = " ".join(container(dep)["args"])
        assert "--tls" not in args and "--upstream-ca" not in args and "--auth-tokens-file" not in args
        assert "tls" not in {v["name"] for v in pod_spec(dep)["volumes"]}
    assert not [d for d in docs if d["kind"] == "Certificate"]
    assert not [d for d in docs if d["kind"] == "Secret"]


def test_tls_should_mount_each_component_s_secret_and_require_mesh_client_certificates():
    deps = by_kind(render({**TLS, **AUTH}), "Deployment")
    for name, dep in deps.items():
        c = container(dep)
        cfg = parse(name, c)  # the real entry points accept every flag
        (mount,) = [m for m in c["volumeMounts"] if m["name"] == "tls"]
        assert mount == {"name": "tls", "mountPath": "/etc/eftmesh/tls", "readOnly": True}
        (vol,) = [v for v in pod_spec(dep)["volumes"] if v["name"] == "tls"]
        component = "combiner" if name.endswith("-combiner") else "logit"
        assert vol["secret"]["secretName"] == f"eft-eftmesh-{component}-tls"
        assert cfg.server.tls.cert == "/etc/eftmesh/tls/tls.crt" and cfg.server.tls.key == "/etc/eftmesh/tls/tls.key"
        # Probes stay on the plaintext health-only port.
        assert c["readinessProbe"]["grpc"]["port"] != cfg.server.port
        if component == "logit":
            assert cfg.server.tls.client_ca == "/etc/eftmesh/tls/ca.crt"
        else:
            up = cfg.policy.tls
            assert (up.ca, up.cert, up.key) == ("/etc/eftmesh/tls/ca.crt", "/etc/eftmesh/tls/tls.crt",
                                                "/etc/eftmesh/tls/tls.key")
            assert cfg.auth_tokens_file == "/etc/eftmesh/auth/tokens"
            (tokens,) = [v for v in pod_spec(dep)["volumes"] if v["name"] == "auth-tokens"]
            assert tokens["secret"]["secretName"] == "eft-tokens"
            assert not [m for m in c["volumeMounts"] if m["name"] == "auth-tokens" and "subPath" in m]
    no_mtls = by_kind(render({"tls": {"enabled": True, "mtls": False}}), "Deployment")
    for dep in no_mtls.values():
        args = container(dep)["args"]
        assert not [a for a in args if a.startswith(("--tls-client-ca", "--upstream-cert", "--upstream-key"))]


def test_cert_manager_should_issue_both_certificates_for_the_names_dialled():
    docs = render(CERT_MANAGER)
    certs = by_kind(docs, "Certificate")
    assert set(certs) == {"eft-eftmesh-combiner", "eft-eftmesh-logit"}
    for cert in certs.values():
        assert cert["apiVersion"] == "cert-manager.io/v1"
        assert cert["spec"]["issuerRef"] == {"name": "mesh-ca", "kind": "Issuer", "group": "cert-manager.io"}
    combiner, logit = certs["eft-eftmesh-combiner"]["spec"], certs["eft-eftmesh-logit"]["spec"]
    assert combiner["secretName"] == "eft-eftmesh-combiner-tls" and "client auth" in combiner["usages"]
    assert {"eft-eftmesh-combiner.serving.svc", "eft.example.com"} <= set(combiner["dnsNames"])
    assert logit["secretName"] == "eft-eftmesh-logit-tls"
    # The combiner checks the host of each role's target (k8s:///<headless>.<ns>:port).
    args = container(by_kind(docs, "Deployment")["eft-eftmesh-combiner"])["args"]
    for a in args:
        if a.startswith("--upstream="):
            host = a.split(":///", 1)[1].rsplit(":", 1)[0]
            assert host in logit["dnsNames"]


def test_a_chart_made_token_secret_and_the_helm_test_should_follow_tls_and_auth():
    docs = render({**TLS, "auth": {"enabled": True, "tokens": ["t1", "t2"]}})
    (secret,) = by_kind(docs, "Secret").values()
    assert secret["metadata"]["name"] == "eft-eftmesh-combiner-tokens"
    assert secret["stringData"]["tokens"].split() == ["t1", "t2"]
    (pod,) = [d for d in docs if d["kind"] == "Pod"]
    args = pod["spec"]["containers"][0]["args"]
    assert "--tls-ca=/etc/eftmesh/tls/ca.crt" in args and "--token-file=/etc/eftmesh/auth/tokens" in args


@pytest.mark.parametrize("values, message", [
    ({"tls": {"enabled": True}, "logit": {"healthPort": None}}, "needs logit.healthPort"),
    ({"tls": {"enabled": True, "certManager": {"enabled": True}}}, "issuerRef.name"),
    ({"auth": {"enabled": True}}, "auth.existingSecret"),
])
def test_bad_security_values_should_fail_with_a_message_that_names_the_fix(values, message):
    with pytest.raises(helm_python.HelmError) as info:
        render(values)
    assert message in str(info.value)
