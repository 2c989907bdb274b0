"""Coverage-guided fuzzing (atheris) of what the combiner does with a client's bytes before any
model runs: protobuf decoding and request validation (`request_from_pb`).

Run by `make fuzz` (atheris in its own venv, build/fuzz-venv); `make fuzz ARGS="-runs=200000"`
runs longer. A finding is any exception other than the named `EftMeshError`s a caller may get,
or one of those that maps to INTERNAL or UNKNOWN.
"""

from __future__ import annotations

import sys

import atheris

with atheris.instrument_imports():
    import grpc
    from google.protobuf.message import DecodeError

    from eftmesh.combiner.convert import Defaults, SpeculationDefaults, request_from_pb
    from eftmesh.common.errors import EftMeshError
    from eftmesh.core.mixing import Composition, Delta
    from eftmesh.core.sampling import SamplingConfig
    from eftmesh.v1 import generator_pb2

DEFAULTS = Defaults(
    Composition("base-large", (Delta("ft-small", "base-small", 1.0),)),
    SamplingConfig(temperature=1.0, top_p=0.95), 64, 1024, SpeculationDefaults(),
)
ROLES = dict.fromkeys(["base-large", "base-small", "ft-small"])
NEVER = {grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN}


def one_input(data: bytes) -> None:
    try:
        msg = generator_pb2.CompleteRequest.FromString(data)
    except (DecodeError, UnicodeDecodeError):
        return  # the server answers these INVALID_ARGUMENT (common/interceptor.py)
    try:
        request_from_pb(msg, DEFAULTS, ROLES)
    except EftMeshError as e:
        if e.code in NEVER:
            raise


def main() -> None:
    atheris.Setup(sys.argv, one_input)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
