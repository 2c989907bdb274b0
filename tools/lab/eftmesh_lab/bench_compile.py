"""`make bench-compile`: the logit services' `--torch-compile` against their eager step, side by side.

Two meshes over the same demo checkpoints run at once: one as shipped (eager steps on a CPU)
and one whose logit services compile their static-shaped steps at warm-up (`--torch-compile`).
Both decode EFT up-scaling greedily, plain (speculation off), a fixed number of new tokens, EOS
ignored, beside `lockstep` (bench_load's one-process eager loop over the same three
checkpoints: the in-process reference of issue 15's point 6). Repetitions alternate between the
three systems so the machine's noise hits all alike; the idle mesh costs the measured one
little (its processes wait on sockets). Also written: each compiled service's warm-up compile
time (`Info.compile_s`), the compiled mesh's start-up time, and its ratios to lockstep.

    python -m eftmesh_lab.bench_compile --concurrency 1,4,16 --reps 5 --out bench/compile.json
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import time
from collections.abc import Sequence
from pathlib import Path

import grpc
import torch

from eftmesh_lab.bench import workload_prompts
from eftmesh_lab.bench_load import (COMPOSITION, MODES, ROLES, MeshClient, lockstep_generate, load_family, machine,
                                    sweep, write)
from eftmesh.launcher import LocalMesh, resolve_models
from eftmesh.v1 import logit_pb2, logit_pb2_grpc

SYSTEMS = ("lockstep", "mesh-plain eager", "mesh-plain compiled")


def service_info(lm: LocalMesh) -> dict[str, dict]:
    out = {}
    for role, port in lm.ports.items():
        with grpc.insecure_channel(f"127.0.0.1:{port}") as ch:
            i = logit_pb2_grpc.LogitServiceStub(ch).Info(logit_pb2.LogitServiceInfoRequest(), timeout=10)
        out[role] = {"execution": i.execution, "compile_s": round(i.compile_s, 1), "model_impl": i.model_impl}
    return out


def sweep_meshes(a: argparse.Namespace, variants: dict[str, list[str]], log_dir: Path,
                 ) -> tuple[dict, dict[str, dict], dict[str, float]]:
    """One mesh per variant (name -> its logit services' extra flags) on ports a.port, +10, ...,
    all up at once, swept beside `lockstep` with repetitions alternating between every system
    (the idle meshes cost the measured one little: their processes wait on sockets). Returns
    bench_load.sweep's runs, each mesh's services' Info and each mesh's start-up seconds."""
    ns = sorted({int(n) for n in a.concurrency.split(",") if n})
    roles = {r: path for r, path in resolve_models(Path(a.models)).items() if r in ROLES}
    prompts = workload_prompts(Path(a.models), "qa", max(ns))
    torch.set_num_threads(1)  # every system one thread per model, as the services run
    family = load_family(roles, "cpu", "float32")
    kw = dict(threads=1, device="cpu", dtype="float32", verbose=False,
              combiner_args=["--max-concurrent-generations", str(max(ns))])
    info, startup, clients = {}, {}, {}
    with contextlib.ExitStack() as stack:
        for i, (name, args) in enumerate(variants.items()):
            port = a.port + 10 * i
            print(f"starting {name} on 127.0.0.1:{port} (logit flags: {' '.join(args) or 'none'})", flush=True)
            started = time.perf_counter()
            lm = stack.enter_context(LocalMesh(roles, port, log_dir=log_dir / name.replace(" ", "-"),
                                               logit_args=args, **kw))
            startup[name], info[name] = time.perf_counter() - started, service_info(lm)
            print(f"  up in {startup[name]:.0f} s: {info[name]}", flush=True)
            clients[name] = stack.enter_context(contextlib.closing(MeshClient(lm.address)))
        runners = {"lockstep": lambda ps, m: sum(len(t) for t in lockstep_generate(family, ps, m)),
                   **{name: plain(c) for name, c in clients.items()}}
        return sweep(runners, prompts, ns, a.max_new, a.reps), info, startup


def mesh_tables(runs: dict, systems: Sequence[str], pair: str) -> dict:
    """The JSON's tokens/s medians, every repetition, and ratios: each mesh over lockstep and
    the second mesh over the first (named `pair`). systems: lockstep and the two meshes."""
    med = {name: {n: statistics.median(v) for n, v in row.items()} for name, row in runs.items()}
    ns = sorted(med["lockstep"])
    return {
        "tokens_per_s": {name: {str(n): v for n, v in row.items()} for name, row in med.items()},
        "runs": {name: {str(n): v for n, v in row.items()} for name, row in runs.items()},
        "ratios": {f"{name} / lockstep": {str(n): med[name][n] / med["lockstep"][n] for n in ns}
                   for name in systems[1:]} | {pair: {str(n): med[systems[2]][n] / med[systems[1]][n] for n in ns}},
    }


def plain(client: MeshClient):
    """A bench_load runner: one round of plain (speculation off) generations through `client`."""
    return lambda prompts, max_new: client.round(prompts, max_new, MODES["mesh-plain"])


def markdown(out: dict) -> str:
    ns = out["concurrency"]
    lines = ["| system | " + " | ".join(f"N={n}" for n in ns) + " |", "|---" * (len(ns) + 1) + "|"]
    for name, row in out["tokens_per_s"].items():
        lines.append(f"| {name} | " + " | ".join(f"{row[str(n)]:.1f}" for n in ns) + " |")
    lines += ["", "| ratio | " + " | ".join(f"N={n}" for n in ns) + " |", "|---" * (len(ns) + 1) + "|"]
    for name, row in out["ratios"].items():
        lines.append(f"| {name} | " + " | ".join(f"{row[str(n)]:.2f}" for n in ns) + " |")
    lines += ["", "| role | execution | compile s |", "|---|---|---|"]
    for role, i in out["compiled_services"].items():
        lines.append(f"| {role} | {i['execution']} | {i['compile_s']} |")
    lines.append(f"\ncompiled mesh start-up: {out['compiled_startup_s']:.0f} s (eager mesh: {out['eager_startup_s']:.0f} s)")
    return "\n".join(lines)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="eftmesh-bench-compile", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", default="models/demo", help="checkpoint per role (default: %(default)s)")
    p.add_argument("--concurrency", default="1,4,16", help="values of N, comma-separated (default: %(default)s)")
    p.add_argument("--max-new", type=int, default=64, help="new tokens per generation, EOS ignored (default: %(default)s)")
    p.add_argument("--reps", type=int, default=5, help="repetitions per system and N; medians reported (default: %(default)s)")
    p.add_argument("--port", type=int, default=50650, help="first port of the eager mesh; the compiled one takes +10 (default: %(default)s)")
    p.add_argument("--out", default="bench/compile.json", help="JSON results (default: %(default)s)")
    p.add_argument("--plot", default="bench/compile.png", help="plot of tokens/s against N; empty for none (default: %(default)s)")
    return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> None:
    a = parse_args(argv)
    ns = sorted({int(n) for n in a.concurrency.split(",") if n})
    runs, info, startup = sweep_meshes(a, {SYSTEMS[1]: [], SYSTEMS[2]: ["--torch-compile"]}, Path("build/bench-compile"))
    out = {
        "what": "the logit services' --torch-compile against their eager step: EFT up-scaling, plain, greedy; "
                "tokens/s medians over alternating repetitions, both meshes and lockstep in one run",
        "composition": COMPOSITION, "max_new": a.max_new, "concurrency": ns, "machine": machine("cpu"),
        "args": {**vars(a), "dtype": "float32"}, **mesh_tables(runs, SYSTEMS, "compiled / eager mesh"),
        "compiled_services": info[SYSTEMS[2]], "compiled_startup_s": startup[SYSTEMS[2]],
        "eager_startup_s": startup[SYSTEMS[1]], "poisson": None,
    }
    write(out, markdown(out), a.out, a.plot)


if __name__ == "__main__":
    main()
