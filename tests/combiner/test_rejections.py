"""`eftmesh.generations.rejected` counts every RESOURCE_EXHAUSTED a client gets, whichever limit
said no: the combiner's --max-concurrent-generations and --queue-timeout, and gRPC's own
--max-concurrent-rpcs and --max-request-bytes, which refuse before any servicer code runs."""

from __future__ import annotations

from collections import Counter
from concurrent import futures

import grpc
import pytest
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader

from conftest import collect, start_logit
from eftmesh.combiner.server import DEFAULT_COMPOSITION, CombinerConfig
from eftmesh.combiner.server import build as build_combiner
from eftmesh.combiner.scheduler import SchedulerConfig
from eftmesh.combiner.servicer import Defaults
from eftmesh.common.serving import ServerConfig
from eftmesh.core.sampling import SamplingConfig
from eftmesh.v1 import generator_pb2, generator_pb2_grpc

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def tight_mesh(tiny_family):
    """A combiner with every limit small: 6 RPCs in flight, 3 generations, 1 stepped at a
    time, 0.3 s in the queue, 2 KiB requests."""
    logits = {role: start_logit(path, role) for role, path in tiny_family.items()}
    reader = InMemoryMetricReader()
    cfg = CombinerConfig(
        upstreams={r: f"127.0.0.1:{ls.server.port}" for r, ls in logits.items()},
        tokenizer=str(tiny_family["base-small"]),
        defaults=Defaults(DEFAULT_COMPOSITION, SamplingConfig(temperature=0.0), 16, 256),
        server=ServerConfig(host="127.0.0.1", port=0, grace_s=1.0, workers=16, max_concurrent_rpcs=6),
        max_concurrent_generations=3,
        scheduler=SchedulerConfig(max_batch=1, queue_timeout_s=0.3),
        max_request_bytes=2048,
    )
    cs = build_combiner(cfg, meter_provider=MeterProvider(metric_readers=[reader]))
    cs.start()
    yield cs, reader
    cs.stop(0)
    for ls in logits.values():
        ls.server.stop(0).wait()


def test_every_resource_exhausted_answer_should_be_counted_once_with_the_limit_that_said_no(tight_mesh):
    cs, reader = tight_mesh
    channel = grpc.insecure_channel(f"127.0.0.1:{cs.server.port}")
    stub = generator_pb2_grpc.GeneratorStub(channel)
    long = generator_pb2.CompleteRequest(prompt="The quick brown fox", max_new_tokens=200, ignore_eos=True)
    too_big = generator_pb2.CompleteRequest(prompt="x" * 4096, max_new_tokens=2)

    def call(req) -> str:
        try:
            if isinstance(req, generator_pb2.GenerateRequest):
                list(stub.Generate(req, timeout=60))
            else:
                stub.Complete(req, timeout=60)
        except grpc.RpcError as e:
            return e.code().name
        return "OK"

    streamed = generator_pb2.GenerateRequest(prompt="Hello", max_new_tokens=200, ignore_eos=True)
    mixed = [long] * 10 + [streamed] * 4 + [too_big] * 3
    with futures.ThreadPoolExecutor(len(mixed)) as pool:
        answers = Counter(pool.map(call, mixed))
    answers.update(call(r) for r in (too_big, too_big))  # alone: refused for size, not for load
    channel.close()

    rejected = collect(reader)["eftmesh.generations.rejected"]
    by_reason = Counter()
    for p in rejected:
        by_reason[p.attributes["eftmesh.reason"]] += p.value
    assert sum(by_reason.values()) == answers["RESOURCE_EXHAUSTED"], (answers, by_reason)
    assert {"concurrency_limit", "queue_timeout", "max_concurrent_rpcs", "request_too_large"} <= set(by_reason), by_reason
    assert by_reason["request_too_large"] >= 1
    assert {p.attributes["rpc.method"] for p in rejected} <= {"Complete", "Generate"}
