"""Protobuf <-> domain conversions shared by both services, and the one mapping of a domain
rule's ValueError to INVALID_ARGUMENT.

Each service has its own converter module (`eftmesh.combiner.convert`, `eftmesh.logit.convert`,
TGI's from_pb / to_pb shape): servicers call those and stay thin. A validation rule lives once,
in the domain type that needs it (`SamplingConfig`, `Composition`, `GenerationRequest`, ...),
which raises ValueError with a message naming the request field; converters build domain
types inside `invalid_argument()`, the single place that turns such a ValueError into the
INVALID_ARGUMENT status.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from eftmesh.common.errors import InvalidArgument
from eftmesh.core.sampling import SamplingConfig
from eftmesh.v1 import tensor_pb2


@contextmanager
def invalid_argument() -> Iterator[None]:
    """A ValueError raised inside (a domain rule the request broke) becomes InvalidArgument."""
    try:
        yield
    except InvalidArgument:
        raise
    except ValueError as e:
        raise InvalidArgument(str(e)) from None


def sampling_from_pb(msg: tensor_pb2.SamplingParams, default: SamplingConfig) -> SamplingConfig:
    """SamplingParams as a SamplingConfig; unset fields take `default`'s values."""
    with invalid_argument():
        return SamplingConfig(
            temperature=msg.temperature if msg.HasField("temperature") else default.temperature,
            top_k=msg.top_k if msg.HasField("top_k") else default.top_k,
            top_p=msg.top_p if msg.HasField("top_p") else default.top_p,
        )


def sampling_to_pb(cfg: SamplingConfig) -> tensor_pb2.SamplingParams:
    return tensor_pb2.SamplingParams(temperature=cfg.temperature, top_k=cfg.top_k, top_p=cfg.top_p)
