"""The Helm chart, rendered by Helm's own engine (helm-python-sdk bundles Helm v4's Go library:
real templates, real values schema, real `fail` messages), with every manifest checked against
the Kubernetes API schemas (kubernetes-validate) and every container's flags parsed by the
real eftmesh entry points. No cluster runs here, so nothing is applied.
"""

from __future__ import annotations

from pathlib import Path

import helm_python
import kubernetes_validate
import pytest
import yaml

from eftmesh.combiner.replicas import parse_target
from eftmesh.combiner.server import parse_args as combiner_args
from eftmesh.logit.server import parse_args as logit_args

CHART = Path(__file__).resolve().parents[2] / "helm" / "eftmesh"
KUBE_VERSIONS = ("1.27", "1.32", "1.37")


def render(values: dict | None = None, *files: str) -> list[dict]:
    """All manifests of a release "eft" in namespace "serving", as parsed YAML documents."""
    merged: dict = {}
    for name in files:
        merged = _deep_merge(merged, yaml.safe_load((CHART / name).read_text()))
    merged = _deep_merge(merged, values or {})
    with helm_python.Chart.load(CHART) as chart:
        rendered = chart.render(merged, name="eft", namespace="serving")
    docs = []
    for path, text in rendered.items():
        if path.endswith(".txt"):
            continue
        docs += [d for d in yaml.safe_load_all(text) if d]
    return docs


def _deep_merge(a: dict, b: dict) -> dict:
    out = dict(a)
    for k, v in b.items():
        out[k] = _deep_merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def by_kind(docs: list[dict], kind: str) -> dict[str, dict]:
    return {d["metadata"]["name"]: d for d in docs if d["kind"] == kind}


def container(deployment: dict) -> dict:
    (c,) = deployment["spec"]["template"]["spec"]["containers"]
    return c


def test_lint_reports_no_warnings_or_errors():
    report = helm_python.lint(CHART, kube_version="v1.32.0")
    assert report["errors"] == []
    assert [m for m in report["messages"] if m["severity"] >= 2] == []


@pytest.mark.parametrize("files", [(), ("values-cpu.yaml",)], ids=["gpu-default", "cpu"])
def test_every_manifest_is_valid_kubernetes(files):
    docs = render(None, *files)
    assert len(docs) >= 10
    for version in KUBE_VERSIONS:
        for doc in docs:
            kubernetes_validate.validate(doc, version, strict=True)  # raises on any schema error


def test_default_release_has_one_logit_service_per_role_and_an_autoscaled_combiner():
    docs = render()
    deployments, services = by_kind(docs, "Deployment"), by_kind(docs, "Service")
    roles = {"base-large", "base-small", "ft-small"}
    assert set(deployments) == {f"eft-eftmesh-logit-{r}" for r in roles} | {"eft-eftmesh-combiner"}
    assert set(services) == set(deployments) | {f"eft-eftmesh-logit-{r}-replicas" for r in roles}
    for role in roles:
        dep = deployments[f"eft-eftmesh-logit-{role}"]
        cfg = logit_args(container(dep)["args"][1:], environ={})
        assert cfg.role == role and cfg.model == f"/app/models/demo/{role}"
        assert cfg.device == "cuda" and cfg.dtype == "bfloat16"
        assert container(dep)["resources"]["limits"]["nvidia.com/gpu"] == 1
        # the Service selects exactly this role's pods
        selector = services[f"eft-eftmesh-logit-{role}"]["spec"]["selector"]
        assert "clusterIP" not in services[f"eft-eftmesh-logit-{role}"]["spec"]  # the ClusterIP one, for other clients
        assert selector.items() <= dep["spec"]["template"]["metadata"]["labels"].items()
        assert selector["eftmesh.io/role"] == role
    combiner = deployments["eft-eftmesh-combiner"]
    assert "replicas" not in combiner["spec"]  # the HPA owns it
    (hpa,) = by_kind(docs, "HorizontalPodAutoscaler").values()
    assert hpa["spec"]["scaleTargetRef"]["name"] == "eft-eftmesh-combiner"
    assert (hpa["spec"]["minReplicas"], hpa["spec"]["maxReplicas"]) == (2, 10)


def test_combiner_flags_parse_and_resolve_each_role_s_pods_through_a_headless_service():
    docs = render()
    services = by_kind(docs, "Service")
    deployments = by_kind(docs, "Deployment")
    c = container(deployments["eft-eftmesh-combiner"])
    assert c["args"][0] == "combiner"
    cfg = combiner_args(c["args"][1:], environ={})
    for role, target in cfg.upstreams.items():
        kind, (entry,) = parse_target(target)
        host, port = entry.split(":")
        assert kind == "dns" and host in services
        svc = services[host]["spec"]
        assert svc["clusterIP"] == "None"  # DNS answers with every ready pod, not a virtual IP
        pods = deployments[f"eft-eftmesh-logit-{role}"]["spec"]["template"]["metadata"]["labels"]
        assert svc["selector"].items() <= pods.items() and svc["selector"]["eftmesh.io/role"] == role
        assert int(port) == svc["ports"][0]["port"] == container(deployments[f"eft-eftmesh-logit-{role}"])["ports"][0]["containerPort"]
    assert set(cfg.upstreams) == {"base-large", "base-small", "ft-small"}
    assert cfg.tokenizer == "/app/models/demo/ft-small"


def test_probes_use_grpc_health_on_the_serving_port():
    for dep in by_kind(render(), "Deployment").values():
        c = container(dep)
        port = c["ports"][0]["containerPort"]
        for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
            assert c[probe]["grpc"]["port"] == port
        # SIGTERM drains for --grace seconds; Kubernetes must wait longer than that
        grace = float(next(a.split("=")[1] for a in c["args"] if a.startswith("--grace=")))
        assert dep["spec"]["template"]["spec"]["terminationGracePeriodSeconds"] > grace


def test_cpu_values_drop_gpu_requests():
    docs = render(None, "values-cpu.yaml")
    for name, dep in by_kind(docs, "Deployment").items():
        c = container(dep)
        assert "nvidia.com/gpu" not in c["resources"].get("limits", {}), name
        assert "tolerations" not in dep["spec"]["template"]["spec"], name
        if "-logit-" in name:
            cfg = logit_args(c["args"][1:], environ={})
            assert (cfg.device, cfg.dtype, cfg.threads) == ("cpu", "float32", 1)


def test_roles_volume_and_tracing_are_configurable():
    docs = render({
        "models": {"volume": {"persistentVolumeClaim": {"claimName": "ckpts"}}},
        "otel": {"endpoint": "http://collector.obs:4317"},
        "logit": {"roles": {"ft-large": {"model": "/app/models/demo/ft-large", "replicas": 2,
                                         "dtype": "float16"}}},
        "combiner": {"defaultComposition": {"base": "base-small",
                                            "deltas": ["ft-large,base-large,1.5"]},
                     "autoscaling": {"enabled": False}, "replicas": 3},
    })
    deployments = by_kind(docs, "Deployment")
    ft_large = deployments["eft-eftmesh-logit-ft-large"]
    assert ft_large["spec"]["replicas"] == 2
    assert logit_args(container(ft_large)["args"][1:], environ={}).dtype == "float16"
    assert "eft-eftmesh-logit-ft-large" in by_kind(docs, "PodDisruptionBudget")  # 2 replicas
    combiner = deployments["eft-eftmesh-combiner"]
    assert combiner["spec"]["replicas"] == 3 and not by_kind(docs, "HorizontalPodAutoscaler")
    cfg = combiner_args(container(combiner)["args"][1:], environ={})
    assert "ft-large" in cfg.upstreams
    for dep in deployments.values():
        spec = dep["spec"]["template"]["spec"]
        assert {"name": "models", "persistentVolumeClaim": {"claimName": "ckpts"}} in spec["volumes"]
        mounts = {m["name"]: m for m in container(dep)["volumeMounts"]}
        assert mounts["models"]["readOnly"] is True
        env = {e["name"]: e.get("value") for e in container(dep)["env"]}
        assert env["OTEL_EXPORTER_OTLP_ENDPOINT"] == "http://collector.obs:4317"
        assert "k8s.pod.name=$(POD_NAME)" in env["OTEL_RESOURCE_ATTRIBUTES"]


def test_no_otlp_exporter_without_an_endpoint():
    for dep in by_kind(render(), "Deployment").values():
        names = {e["name"] for e in container(dep)["env"]}
        assert "OTEL_EXPORTER_OTLP_ENDPOINT" not in names


@pytest.mark.parametrize("values, message", [
    ({"combiner": {"speculation": {"mode": "fast"}}},
     "/combiner/speculation/mode"),
    ({"logit": {"defaults": {"dtype": "int4"}}}, "/logit/defaults/dtype"),
    ({"logit": {"roles": {"Base_Large": {"model": "/m"}}}}, "Base_Large"),
    ({"combiner": {"defaultComposition": {"base": "base-huge", "deltas": []}}},
     'combiner.defaultComposition.base "base-huge" is not among logit.roles'),
    ({"combiner": {"defaultComposition": {"base": "base-large", "deltas": ["ft-large,base-large"]}}},
     'names role "ft-large", which is not among logit.roles'),
    ({"logit": {"roles": {"ft-large": {"replicas": 1}}}}, "logit.roles.ft-large.model is required"),
])
def test_bad_values_fail_with_a_message_that_names_the_fix(values, message):
    with pytest.raises(helm_python.HelmError) as info:
        render(values)
    assert message in str(info.value)


def test_helm_test_hook_runs_a_generation_against_the_combiner_service():
    with helm_python.Chart.load(CHART) as chart:
        rendered = chart.render({}, name="eft", namespace="serving")
    (pod,) = [yaml.safe_load(t) for p, t in rendered.items() if "/tests/" in p]
    assert pod["metadata"]["annotations"]["helm.sh/hook"] == "test"
    args = pod["spec"]["containers"][0]["args"]
    assert args[0] == "generate" and "--address=eft-eftmesh-combiner:50050" in args
    kubernetes_validate.validate(pod, "1.32", strict=True)


def test_every_pod_serves_prometheus_metrics_and_says_so():
    for name, dep in by_kind(render(), "Deployment").items():
        c = container(dep)
        parse = combiner_args if name.endswith("-combiner") else logit_args
        assert parse(c["args"][1:], environ={}).metrics_port == 9464
        assert {"name": "metrics", "containerPort": 9464, "protocol": "TCP"} in c["ports"]
        annotations = dep["spec"]["template"]["metadata"]["annotations"]
        assert annotations["prometheus.io/scrape"] == "true" and annotations["prometheus.io/port"] == "9464"
    off = by_kind(render({"metrics": {"enabled": False}, "podAnnotations": {"team": "llm"}}), "Deployment")
    for dep in off.values():
        assert dep["spec"]["template"]["metadata"]["annotations"] == {"team": "llm"}
        assert not any(a.startswith("--metrics-port") for a in container(dep)["args"])


def test_the_combiner_can_also_scale_on_generations_in_flight():
    (hpa,) = by_kind(render({"combiner": {"autoscaling": {"targetActiveGenerations": 8}}}),
                     "HorizontalPodAutoscaler").values()
    pods = [m["pods"] for m in hpa["spec"]["metrics"] if m["type"] == "Pods"]
    assert pods == [{"metric": {"name": "eftmesh_generations_active"},
                     "target": {"type": "AverageValue", "averageValue": "8"}}]
    (default,) = by_kind(render(), "HorizontalPodAutoscaler").values()
    assert [m["type"] for m in default["spec"]["metrics"]] == ["Resource"]
