"""`make bench`: EFT decoding speed on the mesh against the same loop in one process.

Both run the very same `Decoder` loop over the very same checkpoints: in one process through
`LocalScorer` (engines called one after another), and as a mesh (each logit service its own
process, the combiner calling them over loopback gRPC). Repetitions alternate between the
two so that machine noise hits both alike; the medians and their ratio go to a JSON file.

    python -m eftmesh.bench --models models/demo --reps 5 --out bench/results.json
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import grpc
import torch

from eftmesh.combiner.decoding import Decoder, GenerationRequest
from eftmesh.combiner.scoring import LocalScorer
from eftmesh.core.mixing import Composition, Delta
from eftmesh.core.sampling import SamplingConfig
from eftmesh.launcher import LocalMesh, resolve_models
from eftmesh.logit.engine import ModelEngine
from eftmesh.v1 import generator_pb2, generator_pb2_grpc

UPSCALE = Composition("base-large", (Delta("ft-small", "base-small", 1.0),))
PROMPTS = (
    "The quick brown fox",
    "It is a truth universally acknowledged that",
    "In the beginning",
)


def timed(fn: Callable[[], int]) -> tuple[int, float]:
    t0 = time.perf_counter()
    n = fn()
    return n, time.perf_counter() - t0


def main(argv: Sequence[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="eftmesh-bench", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", default="models/demo", help="checkpoint per role (default: %(default)s; tiny random models when absent)")
    p.add_argument("--reps", type=int, default=5, help="repetitions per system (default: %(default)s)")
    p.add_argument("--max-new-tokens", type=int, default=64, help="tokens per generation (default: %(default)s)")
    p.add_argument("--threads", type=int, default=1, help="torch threads per model, in both systems (default: %(default)s)")
    p.add_argument("--device", default="cpu", help="torch device for every model (default: %(default)s)")
    p.add_argument("--dtype", default="float32", help="model dtype (default: %(default)s)")
    p.add_argument("--port", type=int, default=50150, help="first port of the benchmark mesh (default: %(default)s)")
    p.add_argument("--out", default="bench/results.json", help="JSON results file (default: %(default)s)")
    a = p.parse_args(argv)

    roles = {r: path for r, path in resolve_models(Path(a.models)).items() if r in UPSCALE.roles}
    torch.set_num_threads(a.threads)
    print(f"loading {', '.join(roles)} in process", flush=True)
    engines = {r: ModelEngine.from_pretrained(str(path), role=r, device=a.device, dtype=a.dtype) for r, path in roles.items()}
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(roles["base-small"]))
    decoder = Decoder(LocalScorer(engines), tokenizer, len(tokenizer))
    greedy = SamplingConfig(temperature=0.0)

    def in_process() -> int:
        n = 0
        for prompt in PROMPTS:
            req = GenerationRequest(prompt, UPSCALE, greedy, seed=0, max_new_tokens=a.max_new_tokens)
            n += sum(len(c.token_ids) for c in decoder.generate(req))
        return n

    results: dict[str, list[float]] = {"in_process": [], "mesh": []}
    with LocalMesh(roles, a.port, a.threads, a.device, a.dtype, log_dir=Path("build/bench"), verbose=False) as mesh:
        stub = generator_pb2_grpc.GeneratorStub(grpc.insecure_channel(mesh.address))

        def on_mesh() -> int:
            n = 0
            for prompt in PROMPTS:
                r = stub.Complete(generator_pb2.CompleteRequest(prompt=prompt, sampling={"temperature": 0.0}, max_new_tokens=a.max_new_tokens), timeout=600)
                n += len(r.token_ids)
            return n

        in_process(), on_mesh()  # warm-up: caches, allocator, connections
        for rep in range(a.reps):
            for name, fn in (("in_process", in_process), ("mesh", on_mesh)):
                n, dt = timed(fn)
                results[name].append(n / dt)
                print(f"rep {rep + 1}/{a.reps} {name:10s} {n} tokens in {dt:.2f} s: {n / dt:.1f} tokens/s", flush=True)

    med = {k: statistics.median(v) for k, v in results.items()}
    out = {
        "what": "plain EFT up-scaling, greedy, tokens/s; the same Decoder loop in one process and on the mesh",
        "composition": UPSCALE.describe(),
        "models": {r: str(path) for r, path in roles.items()},
        "prompts": list(PROMPTS),
        "max_new_tokens": a.max_new_tokens,
        "reps": a.reps,
        "threads_per_model": a.threads,
        "device": a.device,
        "dtype": a.dtype,
        "machine": {"cpus": torch.get_num_threads(), "platform": platform.platform(), "torch": torch.__version__},
        "tokens_per_s": results,
        "median_tokens_per_s": med,
        "mesh_over_in_process": med["mesh"] / med["in_process"],
    }
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(out, indent=2) + "\n")
    print(f"\n| system | median tokens/s |\n|---|---|\n| in-process EFT loop | {med['in_process']:.1f} |\n| mesh (plain EFT) | {med['mesh']:.1f} |")
    print(f"mesh / in-process = {out['mesh_over_in_process']:.2f}  (written to {a.out})")


if __name__ == "__main__":
    main()
