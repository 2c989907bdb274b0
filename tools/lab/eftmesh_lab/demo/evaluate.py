"""`make eval`: what EFT does on the demo family, measured through the real mesh.

Held-out questions (people outside the fine-tuning subset) go to every system as
Generator.Complete calls, greedy; the answers are scored for exact match and for format
compliance (the tuned chat format, ending with EOS). A cloze probe in pre-training prose
measures the base models' knowledge with no format at all. The systems form the paper's 2x2
of pre-training scale against fine-tuning scale:

                      fine-tuning small            fine-tuning large
    pre-train small   ft-small                     EFT down-scaling
                                                   base-small + (ft-large - base-large)
    pre-train large   EFT up-scaling               ft-large
                      base-large + (ft-small - base-small)

plus the base models given the question, amplified up-scaling ft-small + beta * (base-large -
base-small) for beta in {1.5, 2}, and an interpolation between ft-small's behaviour and
ft-small-alt's: base-small + lambda * (ft-small - base-small) + (1 - lambda) * (ft-small-alt -
base-small).

    python -m eftmesh_lab.demo.evaluate --models models/demo --out eval/results.json
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc

from eftmesh_lab.demo import chat_format
from eftmesh_lab.demo.world import cloze_correct
from eftmesh.launcher import LocalMesh, find_roles
from eftmesh.v1 import generator_pb2, generator_pb2_grpc

D = generator_pb2.Delta
C = generator_pb2.Composition
SYSTEMS: dict[str, generator_pb2.Composition] = {
    "base-small": C(base="base-small"),
    "base-large": C(base="base-large"),
    "ft-small": C(base="ft-small"),
    "ft-large": C(base="ft-large"),
    "EFT up-scaling": C(base="base-large", deltas=[D(tuned="ft-small", reference="base-small", weight=1.0)]),
    "EFT down-scaling": C(base="base-small", deltas=[D(tuned="ft-large", reference="base-large", weight=1.0)]),
    "amplified up-scaling 1.5": C(base="ft-small", deltas=[D(tuned="base-large", reference="base-small", weight=1.5)]),
    "amplified up-scaling 2": C(base="ft-small", deltas=[D(tuned="base-large", reference="base-small", weight=2.0)]),
}
LAMBDAS = (0.0, 0.25, 0.5, 0.75, 1.0)
OFF = {"mode": generator_pb2.SPECULATION_MODE_OFF}


def interpolation(lam: float) -> generator_pb2.Composition:
    return C(base="base-small", deltas=[D(tuned="ft-small", reference="base-small", weight=lam),
                                        D(tuned="ft-small-alt", reference="base-small", weight=1.0 - lam)])


def _norm(s: str | None) -> str:
    return " ".join((s or "").lower().split())


def load_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


class Evaluator:
    def __init__(self, address: str, workers: int = 4) -> None:
        self.stub = generator_pb2_grpc.GeneratorStub(grpc.insecure_channel(address))
        self.pool = ThreadPoolExecutor(workers)

    def complete(self, prompt: str, comp: generator_pb2.Composition, max_new: int) -> str:
        """The completion as the demo family's format reads it: EOS shown as its text."""
        r = self.stub.Complete(
            generator_pb2.CompleteRequest(prompt=prompt, composition=comp, sampling={"temperature": 0.0},
                                          max_new_tokens=max_new, speculation=OFF),
            timeout=300,
        )
        return r.text + (chat_format.EOS_TEXT if r.finish_reason == generator_pb2.FINISH_REASON_EOS else "")

    def qa(self, questions: list[dict], comp: generator_pb2.Composition) -> dict:
        outs = list(self.pool.map(lambda q: self.complete(q["prompt"], comp, 12), questions))
        n = len(questions)
        return {
            "accuracy": sum(_norm(chat_format.extract_answer(o)) == _norm(q["answer"]) for o, q in zip(outs, questions)) / n,
            "format_compliance": sum(chat_format.is_compliant(o) for o in outs) / n,
            "alt_behaviour": sum(chat_format.is_alt_behaviour(o) for o in outs) / n,
            "examples": [{"question": q["question"], "gold": q["answer"], "completion": o} for q, o in list(zip(questions, outs))[:3]],
        }

    def cloze(self, probes: list[dict], role: str) -> float:
        outs = list(self.pool.map(lambda p: self.complete(p["prompt"], C(base=role), 6), probes))
        return sum(cloze_correct(o, p["gold"]) for o, p in zip(outs, probes)) / len(probes)


def run(models: Path, limit: int | None = None, port: int = 50350, log_dir: Path = Path("build/eval"), verbose: bool = True) -> dict:
    """Start the mesh on `models`, evaluate every system, return the results."""
    questions = load_jsonl(models / "eval" / "questions.jsonl")
    probes = [p for p in load_jsonl(models / "eval" / "cloze.jsonl") if p["split"] == "heldout"]
    if limit:
        questions = questions[:: max(1, len(questions) // limit)][:limit]
        probes = probes[:: max(1, len(probes) // limit)][:limit]
    roles = find_roles(models)
    missing = {"base-small", "base-large", "ft-small", "ft-large", "ft-small-alt"} - set(roles)
    if missing:
        raise SystemExit(f"{models} lacks {', '.join(sorted(missing))}: run `make models` first")
    say = print if verbose else (lambda *a, **k: None)
    t0 = time.perf_counter()
    with LocalMesh(roles, port, threads=1, log_dir=log_dir, verbose=verbose,
                   combiner_args=["--max-new-tokens-cap", "64"]) as mesh:
        ev = Evaluator(mesh.address)
        results: dict = {"questions": len(questions), "cloze_probes": len(probes), "systems": {}, "cloze": {}, "interpolation": {}}
        for role in ("base-small", "base-large"):
            results["cloze"][role] = ev.cloze(probes, role)
            say(f"cloze {role:26s} accuracy {results['cloze'][role]:.3f}", flush=True)
        for name, comp in SYSTEMS.items():
            r = ev.qa(questions, comp)
            results["systems"][name] = r
            say(f"qa    {name:26s} accuracy {r['accuracy']:.3f}  format {r['format_compliance']:.3f}", flush=True)
        for lam in LAMBDAS:
            r = ev.qa(questions, interpolation(lam))
            results["interpolation"][f"{lam:g}"] = r
            say(f"interpolation lambda={lam:<4g}          accuracy {r['accuracy']:.3f}  format {r['format_compliance']:.3f}  alt {r['alt_behaviour']:.3f}", flush=True)
    results["seconds"] = time.perf_counter() - t0
    s, c = results["systems"], results["cloze"]
    up, ft = s["EFT up-scaling"], s["ft-small"]
    ratio = lambda x, y: x / y if y else None  # noqa: E731 - None: the reference is zero
    results["targets"] = {
        "up_accuracy_over_ft_small": ratio(up["accuracy"], ft["accuracy"]),
        "up_accuracy_over_base_large_cloze": ratio(up["accuracy"], c["base-large"]),
        "up_format_over_ft_small": ratio(up["format_compliance"], ft["format_compliance"]),
    }
    return results


def markdown(results: dict) -> str:
    s = results["systems"]
    lines = ["| system | accuracy | format compliance |", "|---|---|---|"]
    lines += [f"| {n} | {r['accuracy']:.3f} | {r['format_compliance']:.3f} |" for n, r in s.items()]
    lines += ["", "| cloze (held-out people, no format) | accuracy |", "|---|---|"]
    lines += [f"| {n} | {v:.3f} |" for n, v in results["cloze"].items()]
    lines += ["", "| 2x2: accuracy (format) | fine-tuning small | fine-tuning large |", "|---|---|---|"]
    f = lambda n: f"{s[n]['accuracy']:.3f} ({s[n]['format_compliance']:.2f})"  # noqa: E731
    lines += [f"| pre-training small | {f('ft-small')} | {f('EFT down-scaling')} (EFT) |",
              f"| pre-training large | {f('EFT up-scaling')} (EFT) | {f('ft-large')} |"]
    lines += ["", "| lambda (ft-small vs ft-small-alt) | tuned format | alt behaviour | accuracy |", "|---|---|---|---|"]
    lines += [f"| {k} | {r['format_compliance']:.3f} | {r['alt_behaviour']:.3f} | {r['accuracy']:.3f} |" for k, r in results["interpolation"].items()]
    return "\n".join(lines)


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    s = results["systems"]
    names = list(s)
    fig, (ax, ax2) = plt.subplots(1, 2, figsize=(11, 4.2), gridspec_kw={"width_ratios": [2.2, 1]})
    x = range(len(names))
    ax.bar([i - 0.2 for i in x], [s[n]["accuracy"] for n in names], 0.4, label="held-out QA accuracy")
    ax.bar([i + 0.2 for i in x], [s[n]["format_compliance"] for n in names], 0.4, label="format compliance")
    for role, v in results["cloze"].items():
        ax.axhline(v, ls=":", color="grey" if role == "base-small" else "black", lw=1, label=f"{role} cloze accuracy")
    ax.set_xticks(list(x), [n.replace(" ", "\n", 1) for n in names], fontsize=7)
    ax.set_ylim(0, 1)
    ax.set_title(f"demo family through the mesh ({results['questions']} held-out questions)")
    ax.legend(fontsize=7)
    lams = [float(k) for k in results["interpolation"]]
    ax2.plot(lams, [r["format_compliance"] for r in results["interpolation"].values()], "o-", label="tuned format (ft-small)")
    ax2.plot(lams, [r["alt_behaviour"] for r in results["interpolation"].values()], "s-", label="alt behaviour (ft-small-alt)")
    ax2.set_xlabel("lambda (weight of ft-small's delta)")
    ax2.set_ylim(0, 1)
    ax2.set_title("behaviour interpolation")
    ax2.legend(fontsize=7)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)


def main(argv: Sequence[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="eftmesh-eval", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", default="models/demo", help="the demo family (default: %(default)s)")
    p.add_argument("--limit", type=int, default=None, help="evaluate on at most this many questions and probes (default: all)")
    p.add_argument("--port", type=int, default=50350, help="first port of the evaluation mesh (default: %(default)s)")
    p.add_argument("--out", default="eval/results.json", help="JSON results (default: %(default)s)")
    p.add_argument("--plot", default="eval/results.png", help="bar chart (default: %(default)s)")
    a = p.parse_args(argv)
    results = run(Path(a.models), a.limit, a.port)
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(results, indent=2) + "\n")
    plot(results, Path(a.plot))
    print("\n" + markdown(results))
    t = {k: "n/a" if v is None else f"{v:.2f}x" for k, v in results["targets"].items()}
    print(f"\nEFT up-scaling accuracy: {t['up_accuracy_over_ft_small']} ft-small's (target >= 2), "
          f"{t['up_accuracy_over_base_large_cloze']} base-large's cloze (target >= 0.8); "
          f"format {t['up_format_over_ft_small']} ft-small's (target >= 0.9)")
    print(f"written to {a.out} and {a.plot} in {results['seconds']:.0f} s")


if __name__ == "__main__":
    main()
