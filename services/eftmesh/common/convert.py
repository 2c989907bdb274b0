"""Protobuf <-> domain conversions shared by both services."""

from __future__ import annotations

import math

from eftmesh.common.errors import InvalidArgument
from eftmesh.core.sampling import GREEDY_TEMPERATURE, SamplingConfig
from eftmesh.v1 import tensor_pb2


def sampling_from_pb(msg: tensor_pb2.SamplingParams, default: SamplingConfig) -> SamplingConfig:
    """Validate SamplingParams; unset fields take `default`'s values."""
    t = msg.temperature if msg.HasField("temperature") else default.temperature
    p = msg.top_p if msg.HasField("top_p") else default.top_p
    k = msg.top_k if msg.HasField("top_k") else default.top_k
    if not math.isfinite(t) or t < 0:
        raise InvalidArgument(
            f"sampling.temperature must be a finite number >= 0 (0, or anything below {GREEDY_TEMPERATURE:g}, is greedy), got {t}"
        )
    if not (0.0 < p <= 1.0):
        raise InvalidArgument(f"sampling.top_p must be in (0, 1] (1 disables it), got {p}")
    if k < 0:
        raise InvalidArgument(f"sampling.top_k must be >= 0 (0 disables it), got {k}")
    return SamplingConfig(temperature=t, top_k=k, top_p=p)


def sampling_to_pb(cfg: SamplingConfig) -> tensor_pb2.SamplingParams:
    return tensor_pb2.SamplingParams(temperature=cfg.temperature, top_k=cfg.top_k, top_p=cfg.top_p)
