"""`make bench`: EFT decoding speed, side by side in one run.

Systems, all decoding the same prompts from the same checkpoints:
  base-large alone   transformers `generate` in this process (the large model by itself)
  in-process EFT     the combiner's own `Decoder` loop over in-process engines (`LocalScorer`)
  mesh, plain EFT    logit services in their own processes, the combiner over loopback gRPC
  mesh, speculative  the same mesh, draft-then-verify with fixed k and adaptive k

Repetitions alternate between systems so that machine noise hits all alike; medians go to a
JSON file and a plot of tokens/s against k (the EFT paper's figure 6). The cost of a draft
token and of a verify step is measured on the mesh, so that the ceiling the measured
acceptance rate allows can be compared with what speculation achieved.

    python -m eftmesh_lab.bench --models models/demo --reps 3 --out bench/results.json
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

from eftmesh.combiner.decoding import GenerationRequest
from eftmesh.combiner.decoder import Decoder
from eftmesh.inprocess import LocalScorer
from eftmesh.core.mixing import Composition, Delta
from eftmesh.core.sampling import SamplingConfig
from eftmesh.core.speculative import expected_tokens_per_block, ideal_speedup, per_draft_acceptance
from eftmesh.launcher import LocalMesh, resolve_models
from eftmesh.logit.engine import ModelEngine
from eftmesh.v1 import generator_pb2, generator_pb2_grpc, logit_pb2, logit_pb2_grpc

UPSCALE = Composition("base-large", (Delta("ft-small", "base-small", 1.0),))
FALLBACK_PROMPTS = ("The quick brown fox", "It is a truth universally acknowledged that", "In the beginning")


def workload_prompts(models: Path, workload: str, n: int) -> list[str]:
    """Prompts of the demo family's evaluation files, or plain prose when there are none.

    qa: held-out questions in the tuned chat format; every system generates a fixed length
    (EOS ignored), so after the answer the models go on with further turns of the chat;
    prose: cloze probes of the synthetic world (continuing pre-training-style prose).
    """
    name = {"prose": "cloze.jsonl", "qa": "questions.jsonl"}[workload]
    path = models / "eval" / name
    if not path.is_file():
        return list(FALLBACK_PROMPTS[:n])
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    step = max(1, len(rows) // n)
    return [r["prompt"] for r in rows[::step][:n]]


class Mesh:
    """Calls into the benchmark mesh."""

    def __init__(self, mesh: LocalMesh) -> None:
        self.mesh = mesh
        self.gen = generator_pb2_grpc.GeneratorStub(grpc.insecure_channel(mesh.address))
        self.logit = {
            r: logit_pb2_grpc.LogitServiceStub(grpc.insecure_channel(f"127.0.0.1:{p}")) for r, p in mesh.ports.items()
        }

    def complete(self, prompt: str, max_new: int, temperature: float, speculation: dict) -> generator_pb2.CompleteResponse:
        return self.gen.Complete(
            generator_pb2.CompleteRequest(
                prompt=prompt, sampling={"temperature": temperature, "top_p": 1.0}, seed=0,
                max_new_tokens=max_new, speculation=speculation, ignore_eos=True,
            ),
            timeout=600,
        )

    def costs(self, prompt_ids: list[int], ks: Sequence[int], reps: int = 5) -> dict:
        """Median latencies (s) of the calls a plain step and a speculative block make.

        step: the three roles' Score of one token, concurrently (one plain EFT step);
        draft[k]: ft-small's Draft of k tokens; verify[k]: base-large and base-small scoring
        k + 1 tokens, concurrently.
        """
        n = len(prompt_ids)
        for stub in self.logit.values():
            stub.Score(logit_pb2.ScoreRequest(session_id="cost", start=0, tokens=prompt_ids, rows=1))

        def fanout(roles: Sequence[str], tokens: list[int]) -> float:
            t0 = time.perf_counter()
            futs = [
                self.logit[r].Score.future(logit_pb2.ScoreRequest(session_id="cost", start=n, tokens=tokens, rows=len(tokens)))
                for r in roles
            ]
            for f in futs:
                f.result()
            return time.perf_counter() - t0

        out: dict = {"step": statistics.median(fanout(list(UPSCALE.roles), [5]) for _ in range(reps)), "draft": {}, "verify": {}}
        for k in ks:
            d = []
            for _ in range(reps):
                t0 = time.perf_counter()
                self.logit["ft-small"].Draft(logit_pb2.DraftRequest(session_id="cost", start=n, tokens=[5], k=k, sampling={"temperature": 0.0}))
                d.append(time.perf_counter() - t0)
            out["draft"][k] = statistics.median(d)
            out["verify"][k] = statistics.median(fanout(["base-large", "base-small"], [5] * (k + 1)) for _ in range(reps))
        for stub in self.logit.values():
            stub.Release(logit_pb2.ReleaseRequest(session_id="cost"))
        return out


def main(argv: Sequence[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="eftmesh-bench", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", default="models/demo", help="checkpoint per role (default: %(default)s; tiny random models when absent)")
    p.add_argument("--workload", default="qa", choices=["prose", "qa"], help="prompts: held-out questions, or world prose to continue (default: %(default)s)")
    p.add_argument("--prompts", type=int, default=3, help="prompts per repetition (default: %(default)s)")
    p.add_argument("--reps", type=int, default=3, help="repetitions per system (default: %(default)s)")
    p.add_argument("--max-new-tokens", type=int, default=64, help="tokens per generation (default: %(default)s)")
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default: %(default)s)")
    p.add_argument("--ks", default="2,4,8,16", help="fixed block sizes to run (default: %(default)s)")
    p.add_argument("--threads", type=int, default=1, help="torch threads per model, in every system (default: %(default)s)")
    p.add_argument("--device", default="cpu", help="torch device for every model, e.g. cuda (default: %(default)s)")
    p.add_argument("--dtype", default="float32", help="model dtype: float32, float16, bfloat16 (default: %(default)s)")
    p.add_argument("--port", type=int, default=50150, help="first port of the benchmark mesh (default: %(default)s)")
    p.add_argument("--out", default="bench/results.json", help="JSON results (default: %(default)s)")
    p.add_argument("--plot", default="bench/speculative.png", help="plot of tokens/s against k (default: %(default)s)")
    a = p.parse_args(argv)
    ks = [int(k) for k in a.ks.split(",") if k]

    models = Path(a.models)
    roles = {r: path for r, path in resolve_models(models).items() if r in UPSCALE.roles}
    prompts = workload_prompts(models, a.workload, a.prompts)
    torch.set_num_threads(a.threads)
    print(f"loading {', '.join(roles)} in this process ({a.device}, {a.dtype}, {a.threads} thread(s))", flush=True)
    engines = {r: ModelEngine.from_pretrained(str(path), role=r, device=a.device, dtype=a.dtype) for r, path in roles.items()}
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(roles["base-small"]))
    decoder = Decoder(LocalScorer(engines), tokenizer, len(tokenizer))
    sampling = SamplingConfig(temperature=a.temperature, top_p=1.0)
    large = engines["base-large"].model

    def base_large_alone() -> tuple[int, dict]:
        n = 0
        for prompt in prompts:
            ids = torch.tensor([tokenizer.encode(prompt)], device=large.device)
            with torch.inference_mode():
                out = large.generate(ids, max_new_tokens=a.max_new_tokens, min_new_tokens=a.max_new_tokens,
                                     do_sample=a.temperature > 0,
                                     temperature=a.temperature or None, top_p=None, top_k=None,
                                     pad_token_id=tokenizer.eos_token_id)
            n += out.shape[1] - ids.shape[1]
        return n, {}

    def in_process() -> tuple[int, dict]:
        n = 0
        for prompt in prompts:
            req = GenerationRequest(prompt, UPSCALE, sampling, seed=0, max_new_tokens=a.max_new_tokens, ignore_eos=True)
            n += sum(len(c.token_ids) for c in decoder.generate(req))
        return n, {}

    results: dict[str, dict] = {}

    def record(name: str, fn: Callable[[], tuple[int, dict]]) -> None:
        t0 = time.perf_counter()
        n, extra = fn()
        dt = time.perf_counter() - t0
        r = results.setdefault(name, {"tokens_per_s": [], "tokens": n, **extra})
        r["tokens_per_s"].append(n / dt)
        r.update(extra)
        tail = f", acceptance {extra['acceptance_rate']:.2f}" if "acceptance_rate" in extra else ""
        print(f"  {name:18s} {n:4d} tokens in {dt:6.2f} s: {n / dt:7.1f} tokens/s{tail}", flush=True)

    log_dir = Path("build/bench")
    with LocalMesh(roles, a.port, a.threads, a.device, a.dtype, log_dir=log_dir, verbose=False,
                   combiner_args=["--max-k", str(max(ks + [16]))]) as lm:
        mesh = Mesh(lm)

        def on_mesh(speculation: dict) -> Callable[[], tuple[int, dict]]:
            def run() -> tuple[int, dict]:
                n = drafted = accepted = blocks = 0
                for prompt in prompts:
                    r = mesh.complete(prompt, a.max_new_tokens, a.temperature, speculation)
                    n += len(r.token_ids)
                    drafted += r.speculation.drafted_tokens
                    accepted += r.speculation.accepted_tokens
                    blocks += r.speculation.blocks
                if not drafted:
                    return n, {}
                return n, {"acceptance_rate": accepted / drafted, "tokens_per_block": n / blocks, "base_calls_per_token": blocks / n}
            return run

        systems: dict[str, Callable[[], tuple[int, dict]]] = {
            "base-large alone": base_large_alone,
            "in-process EFT": in_process,
            "mesh plain EFT": on_mesh({"mode": generator_pb2.SPECULATION_MODE_OFF}),
        }
        for k in ks:
            systems[f"mesh spec k={k}"] = on_mesh({"mode": generator_pb2.SPECULATION_MODE_FIXED, "k": k})
        systems["mesh spec adaptive"] = on_mesh({"mode": generator_pb2.SPECULATION_MODE_ADAPTIVE})

        print("warm-up", flush=True)
        for fn in systems.values():
            fn()
        for rep in range(a.reps):
            print(f"repetition {rep + 1}/{a.reps}", flush=True)
            for name, fn in systems.items():
                record(name, fn)
        costs = mesh.costs(tokenizer.encode(prompts[0]), ks)

    med = {name: statistics.median(r["tokens_per_s"]) for name, r in results.items()}
    plain = med["mesh plain EFT"]
    ceilings = {}
    for k in ks:
        r = results[f"mesh spec k={k}"]
        acc = r.get("acceptance_rate", 0.0)
        # accepted / drafted understates the per-draft acceptance a of the formula (drafts
        # after a rejection are never tested): recover a from the drafts kept per block.
        a_hat = per_draft_acceptance(acc * k, k)
        # Tokens per block over block cost, in units of a plain step: the speed-up this k
        # could give if the combiner and the network cost nothing more.
        block_cost = costs["draft"][k] + costs["verify"][k]
        ceilings[k] = {
            "acceptance_rate": acc,
            "per_draft_acceptance": a_hat,
            "formula_speedup": ideal_speedup(a_hat, k, costs["draft"][k] / k / costs["step"]),
            "cost_ratio_c": costs["draft"][k] / k / costs["step"],
            "verify_over_step": costs["verify"][k] / costs["step"],
            "ideal_speedup": expected_tokens_per_block(a_hat, k) * costs["step"] / block_cost,
            "measured_speedup": med[f"mesh spec k={k}"] / plain,
        }
    best = max((n for n in med if n.startswith("mesh spec")), key=med.get)
    out = {
        "what": "EFT up-scaling tokens/s; medians over repetitions, all systems side by side in one run",
        "composition": UPSCALE.describe(),
        "workload": a.workload,
        "prompts": prompts,
        "max_new_tokens": a.max_new_tokens,
        "temperature": a.temperature,
        "reps": a.reps,
        "threads_per_model": a.threads,
        "device": a.device,
        "dtype": a.dtype,
        "models": {r: str(path) for r, path in roles.items()},
        "machine": {"platform": platform.platform(), "torch": torch.__version__, "cpu_count": torch.get_num_threads()},
        "systems": results,
        "median_tokens_per_s": med,
        "mesh_over_in_process": plain / med["in-process EFT"],
        "best_speculative": best,
        "best_speculative_over_plain_mesh": med[best] / plain,
        "best_speculative_over_base_large_alone": med[best] / med["base-large alone"],
        "costs_s": costs,
        "ceilings": ceilings,
    }
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(out, indent=2) + "\n")

    print("\n| system | median tokens/s | vs plain mesh EFT | acceptance |\n|---|---|---|---|")
    for name, v in med.items():
        acc = results[name].get("acceptance_rate")
        print(f"| {name} | {v:.1f} | {v / plain:.2f}x | {'' if acc is None else f'{acc:.2f}'} |")
    print(f"\nmesh / in-process: {out['mesh_over_in_process']:.2f}; best speculative ({best}): "
          f"{out['best_speculative_over_plain_mesh']:.2f}x plain mesh, {out['best_speculative_over_base_large_alone']:.2f}x base-large alone")
    for k, c in ceilings.items():
        print(f"k={k}: acceptance {c['acceptance_rate']:.2f} (per draft a={c['per_draft_acceptance']:.2f}), c {c['cost_ratio_c']:.2f}, "
              f"verify/step {c['verify_over_step']:.2f}, formula ceiling {c['formula_speedup']:.2f}x, "
              f"with measured verify cost {c['ideal_speedup']:.2f}x, measured {c['measured_speedup']:.2f}x")
    if a.plot:
        plot(out, ks, a.plot)
    print(f"written to {a.out}" + (f" and {a.plot}" if a.plot else ""))


def plot(out: dict, ks: Sequence[int], path: str) -> None:
    """Tokens/s against block size, like the paper's figure, with the reference systems."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    med = out["median_tokens_per_s"]
    plain = med["mesh plain EFT"]
    fig, ax = plt.subplots(figsize=(9.0, 4.0))
    ax.plot(ks, [med[f"mesh spec k={k}"] for k in ks], "o-", label="speculative EFT (mesh), fixed k")
    ax.plot(ks, [out["ceilings"][k]["ideal_speedup"] * plain for k in ks], "o:", color="grey", label="ceiling from measured acceptance and costs")
    ax.axhline(med["mesh spec adaptive"], color="C1", ls="--", label="speculative EFT (mesh), adaptive k")
    ax.axhline(plain, color="C2", ls="-.", label="plain EFT (mesh)")
    ax.axhline(med["in-process EFT"], color="C4", ls=(0, (1, 1)), label="plain EFT (in one process)")
    ax.axhline(med["base-large alone"], color="C3", ls="--", label="base-large alone")
    ax.set_xscale("log", base=2)
    ax.set_xticks(list(ks), [str(k) for k in ks])
    ax.set_xlabel("block size k")
    ax.set_ylabel("tokens / s (median)")
    ax.set_title(f"EFT up-scaling, {out['workload']} workload, {out['device']}")
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))  # outside: never over a point
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    main()
