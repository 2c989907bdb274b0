"""Build the demo family from scratch: corpus, tokenizer, two base models, three fine-tunes.

    python -m eftmesh_lab.demo.build_family --out models/demo --work build/demo [--threads 1]
        [--device cpu|cuda] [--smoke]

Stages run in order and each is skipped when its output exists under --work; training stages
checkpoint every few minutes and resume, so re-running after an interruption is cheap. --work
records what it was built from (BUILD_KEY.json: config, shapes, a digest of the data and
training code); a work dir from another build is refused, or deleted with --fresh. The end
writes the shipped checkpoints (float16 safetensors, tokenizer copied into each), FAMILY.json,
the training loss log, the evaluation files, and prints an in-process sanity check.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import platform
import re
import shutil
import statistics
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import transformers
from tokenizers import ByteLevelBPETokenizer
from transformers import AutoTokenizer, GPT2LMHeadModel, PreTrainedTokenizerBase

from eftmesh_lab.demo import chat_format, corpus, training, world
from eftmesh_lab.demo.inference import greedy_complete, ms_per_forward
from eftmesh_lab.demo.training import (
    BatchFn, LossLog, ModelSpec, Schedule, StageResult, count_parameters, new_model, pair_batches,
    stream_batches, train_stage,
)

SMALL = ModelSpec(n_layer=2, n_embd=64, n_head=2)
# Deep and narrow: on a CPU the per-token cost of these sizes is mostly per-layer overhead,
# so depth buys the >=10x cost ratio cheaply, and a 9-token verify forward costs little more
# than a 1-token one (what speculative decoding needs).
LARGE = ModelSpec(n_layer=30, n_embd=96, n_head=3)
BASES = {"base-small": SMALL, "base-large": LARGE}
# name -> (base it starts from, completion style)
FINETUNES = {"ft-small": ("base-small", "tuned"), "ft-large": ("base-large", "tuned"),
             "ft-small-alt": ("base-small", "alt")}
FAMILY = ("base-small", "base-large", "ft-small", "ft-large", "ft-small-alt")


@dataclass(frozen=True)
class BuildConfig:
    """Everything that determines the family; FAMILY.json records it."""

    seed: int = world.DEFAULT_SEED
    num_people: int = world.DEFAULT_NUM_PEOPLE
    finetune_fraction: float = world.DEFAULT_FINETUNE_FRACTION
    world_copies: int = 40  # distinct documents per person in the world stream
    world_weight: float = 0.9  # share of pre-training rows drawn from the world stream
    vocab_size: int = 2048
    n_positions: int = 256
    block_size: int = 128
    # Pre-training scale is model size and tokens together: base-small also sees fewer tokens
    # (as compute-optimal training would give it), which keeps its knowledge of the world
    # clearly below base-large's; the tiny world is otherwise easy enough to memorise.
    pretrain_small: Schedule = Schedule(steps=400, batch_size=16, lr=2e-3, warmup_steps=50)
    pretrain_large: Schedule = Schedule(steps=1000, batch_size=16, lr=2e-3, warmup_steps=50)
    finetune_small: Schedule = Schedule(steps=250, batch_size=32, lr=1e-3, warmup_steps=20)
    finetune_large: Schedule = Schedule(steps=250, batch_size=32, lr=3e-4, warmup_steps=20)
    prose_chars: int | None = None  # cap on prose used (smoke runs)
    timing_rounds: int = 7


SMOKE = BuildConfig(
    world_copies=2, prose_chars=200_000,
    pretrain_small=Schedule(steps=4, batch_size=4, lr=2e-3, warmup_steps=2),
    pretrain_large=Schedule(steps=4, batch_size=4, lr=2e-3, warmup_steps=2),
    finetune_small=Schedule(steps=3, batch_size=4, lr=1e-3, warmup_steps=1),
    finetune_large=Schedule(steps=3, batch_size=4, lr=3e-4, warmup_steps=1),
    timing_rounds=1,
)


def _log(message: str) -> None:
    print(f"[build_family] {message}", file=sys.stderr, flush=True)


# Modules whose code decides what the stages produce: a work dir built by other code is stale.
_STAGE_SOURCES = (world, chat_format, corpus, training)


def build_key(cfg: BuildConfig) -> dict:
    """What a work dir's stages were built from: the config, the model shapes, and a digest of
    the code that writes the data and trains."""
    digest = hashlib.sha256()
    for module in _STAGE_SOURCES:
        digest.update(Path(module.__file__).read_bytes())
    return {"config": json.loads(json.dumps(asdict(cfg))), "shapes": {"small": asdict(SMALL), "large": asdict(LARGE)},
            "code_sha256": digest.hexdigest()}


def check_work_dir(cfg: BuildConfig, work: Path, fresh: bool) -> None:
    """Make `work` safe to resume from: stages are skipped when their output exists, so a work
    dir left by a different config or different data code would silently yield an old family.
    Refuse it (or, with `fresh`, delete it) unless its recorded build key matches."""
    key, path = build_key(cfg), work / "BUILD_KEY.json"
    if work.exists() and any(work.iterdir()):
        recorded = json.loads(path.read_text()) if path.exists() else None
        if recorded != key:
            if not fresh:
                what = ("it records no build key" if recorded is None else
                        ", ".join(k for k in key if recorded.get(k) != key[k]) + " differ")
                raise SystemExit(f"{work} holds stages of another build ({what}); resuming would mix them "
                                 f"into this one. Delete it, pass --fresh to let the build delete it, or "
                                 f"pass another --work.")
            _log(f"--fresh: deleting {work}, built from another configuration or code")
            shutil.rmtree(work)
    work.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(key, indent=2) + "\n")


def stage_corpus(cfg: BuildConfig, the_world: world.World, work: Path) -> Path:
    """Write the prose and the world's pre-training documents under work/corpus."""
    out = work / "corpus"
    if (out / "DONE").exists():
        return out
    _log("stage corpus: reading prose from Debian packages")
    corpus.ensure_packages()
    prose = [corpus.bible_text(), *corpus.austen_texts().values()]
    if cfg.prose_chars is not None:
        prose = [text[:cfg.prose_chars // len(prose)] for text in prose]
    words = set(re.findall(r"[a-z]+", " ".join(prose).lower()))
    clashes = [p.name for p in the_world.people
               if any(part.lower() in words for part in p.name.split())]
    if clashes:  # the knowledge probe must measure the world, not the prose
        raise RuntimeError(f"invented names occur in the prose: {clashes[:5]}; change the seed")
    docs = world.pretraining_documents(the_world, cfg.world_copies, seed=cfg.seed)
    tags = ("User:", "Assistant:")
    if any(tag in text for text in (*prose, *docs) for tag in tags):
        raise RuntimeError(f"pre-training text contains the tuned chat format's tags {tags}")
    out.mkdir(parents=True, exist_ok=True)
    (out / "prose.json").write_text(json.dumps(prose))
    (out / "world.json").write_text(json.dumps(docs))
    (out / "DONE").touch()
    return out


def stage_tokenizer(cfg: BuildConfig, corpus_dir: Path, work: Path) -> Path:
    """Train the byte-level BPE and encode the corpus into token streams (uint16 .npy).

    Every document and every book starts with BOS (= EOS, id 0), as prompts do.
    """
    out = work / "tokenizer"
    if (out / "DONE").exists():
        return out
    _log("stage tokenizer")
    prose = json.loads((corpus_dir / "prose.json").read_text())
    docs = json.loads((corpus_dir / "world.json").read_text())
    bpe = ByteLevelBPETokenizer()
    # Trained on the whole world stream, as the models are: frequent names get merged into
    # few tokens, which makes them easier to bind to their facts.
    bpe.train_from_iterator([*prose, *docs], vocab_size=cfg.vocab_size, min_frequency=2,
                            special_tokens=[chat_format.EOS_TEXT])
    out.mkdir(parents=True, exist_ok=True)
    bpe.save_model(str(out))
    # GPT-2 tokenizer files; from_pretrained then save_pretrained writes the full set.
    (out / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "GPT2Tokenizer", "bos_token": chat_format.EOS_TEXT,
        "eos_token": chat_format.EOS_TEXT, "unk_token": chat_format.EOS_TEXT,
        "pad_token": chat_format.EOS_TEXT, "add_prefix_space": False,
        "model_max_length": cfg.n_positions,
    }))
    tokenizer = AutoTokenizer.from_pretrained(str(out))
    tokenizer.save_pretrained(str(out))
    if tokenizer.convert_tokens_to_ids(chat_format.EOS_TEXT) != 0:
        raise RuntimeError("<|endoftext|> must be token id 0")
    for name, texts in (("prose", prose), ("world", docs)):
        ids = [[0, *row] for row in tokenizer(list(texts), add_special_tokens=False)["input_ids"]]
        np.save(out / f"{name}.npy", np.concatenate(ids).astype(np.uint16))
    (out / "DONE").touch()
    return out


def pretrain(name: str, cfg: BuildConfig, tokenizer_dir: Path, work: Path, log: LossLog,
             device: torch.device) -> tuple[Path, StageResult]:
    """Pre-train one base model on the prose and world streams."""
    out = work / "stages" / name
    if (out / "stage.json").exists():
        return out, StageResult(**json.loads((out / "stage.json").read_text()))
    spec = BASES[name]
    schedule = cfg.pretrain_small if name == "base-small" else cfg.pretrain_large
    torch.manual_seed(cfg.seed)
    model = new_model(spec, cfg.vocab_size, cfg.n_positions, eos_id=0)
    _log(f"stage {name}: {count_parameters(model) / 1e6:.2f}M parameters")
    streams = [np.load(tokenizer_dir / "prose.npy"), np.load(tokenizer_dir / "world.npy")]
    batches = stream_batches(streams, [1.0 - cfg.world_weight, cfg.world_weight],
                             schedule.batch_size, cfg.block_size)
    result = _train_and_save(name, model, schedule, batches, cfg.seed + 1, out, work, log, device)
    return out, result


def finetune(name: str, cfg: BuildConfig, the_world: world.World,
             tokenizer: PreTrainedTokenizerBase, work: Path, log: LossLog,
             device: torch.device) -> tuple[Path, StageResult]:
    """Fine-tune a base model on the QA format about the fine-tuning people only."""
    out = work / "stages" / name
    if (out / "stage.json").exists():
        return out, StageResult(**json.loads((out / "stage.json").read_text()))
    base, style = FINETUNES[name]
    schedule = cfg.finetune_small if base == "base-small" else cfg.finetune_large
    complete = chat_format.tuned_completion if style == "tuned" else chat_format.alt_completion
    pairs = [(tokenizer.encode(chat_format.build_prompt(ex.question), add_special_tokens=False),
              tokenizer.encode(complete(ex.answer), add_special_tokens=False))
             for ex in world.finetune_examples(the_world)]
    model = GPT2LMHeadModel.from_pretrained(str(work / "stages" / base))
    _log(f"stage {name}: {len(pairs)} examples, from {base}")
    batches = pair_batches(pairs, schedule.batch_size, pad_id=0)
    result = _train_and_save(name, model, schedule, batches, cfg.seed + 2, out, work, log, device)
    return out, result


def _train_and_save(name: str, model: GPT2LMHeadModel, schedule: Schedule, batches: BatchFn,
                    seed: int, out: Path, work: Path, log: LossLog,
                    device: torch.device) -> StageResult:
    checkpoints = work / "checkpoints"
    checkpoints.mkdir(parents=True, exist_ok=True)
    result = train_stage(name, model, schedule, batches, seed, checkpoints / f"{name}.pt", log,
                         device)
    model.to("cpu").save_pretrained(str(out))
    (out / "stage.json").write_text(json.dumps(asdict(result)))
    return result


def export(name: str, stage_dir: Path, tokenizer_dir: Path, out: Path) -> Path:
    """Write a shipped checkpoint: float16 safetensors, config, and the tokenizer files (with the
    chat template for the tuned models), so the directory loads alone with from_pretrained."""
    target = out / name
    if target.exists():
        shutil.rmtree(target)
    model = GPT2LMHeadModel.from_pretrained(str(stage_dir), dtype=torch.float16)
    model.save_pretrained(str(target), safe_serialization=True)
    tokenizer = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    if name in FINETUNES:  # the tuned models speak the chat format; the base models never saw it
        tokenizer.chat_template = chat_format.CHAT_TEMPLATE
    tokenizer.save_pretrained(str(target))
    return target


def write_eval_files(the_world: world.World, out: Path) -> tuple[list[world.QAExample],
                                                                 list[dict[str, str]]]:
    """eval/questions.jsonl (held-out people) and eval/cloze.jsonl (every person, with split)."""
    eval_dir = out / "eval"
    eval_dir.mkdir(parents=True, exist_ok=True)
    questions = world.heldout_questions(the_world, seed=the_world.seed)
    with (eval_dir / "questions.jsonl").open("w") as f:
        for i, q in enumerate(questions):
            f.write(json.dumps({"id": i, "person": q.person, "attribute": q.attribute,
                                "question": q.question,
                                "prompt": chat_format.build_prompt(q.question),
                                "answer": q.answer}) + "\n")
    probes = []
    for probe in world.cloze_probes(the_world.people):
        split = "finetune" if probe.person in the_world.finetune_names else "heldout"
        probes.append({"id": len(probes), "person": probe.person, "attribute": probe.attribute,
                       "split": split, "prompt": probe.prompt, "gold": probe.gold})
    with (eval_dir / "cloze.jsonl").open("w") as f:
        f.writelines(json.dumps(p) + "\n" for p in probes)
    return questions, probes


def sanity_check(out: Path, questions: list[world.QAExample],
                 probes: list[dict[str, str]]) -> dict[str, float]:
    """Greedy, plain transformers, on the shipped float16 weights (computed in float32):
    cloze accuracy of the base models; held-out QA accuracy, format compliance and the
    alternative behaviour's rate of every model and of EFT up-scaling
    (base-large + ft-small - base-small)."""
    models = {n: GPT2LMHeadModel.from_pretrained(str(out / n), dtype=torch.float32).eval()
              for n in FAMILY}
    tokenizer = AutoTokenizer.from_pretrained(str(out / "base-small"))
    heldout = [p for p in probes if p["split"] == "heldout"]
    prompts = [chat_format.build_prompt(q.question) for q in questions]
    systems: dict[str, GPT2LMHeadModel | list[tuple[float, GPT2LMHeadModel]]] = {
        **models, "eft-up": [(1.0, models["base-large"]), (1.0, models["ft-small"]),
                             (-1.0, models["base-small"])]}
    results: dict[str, float] = {}
    for name in ("base-small", "base-large"):
        texts = greedy_complete(models[name], tokenizer, [p["prompt"] for p in heldout], 6)
        results[f"{name}/cloze_heldout"] = statistics.mean(
            world.cloze_correct(t, p["gold"]) for t, p in zip(texts, heldout))
    for name, system in systems.items():
        texts = greedy_complete(system, tokenizer, prompts, 12)
        results[f"{name}/qa_accuracy"] = statistics.mean(
            world.answer_matches(chat_format.extract_answer(t), q.answer)
            for t, q in zip(texts, questions))
        results[f"{name}/compliance"] = statistics.mean(map(chat_format.is_compliant, texts))
        results[f"{name}/alt_rate"] = statistics.mean(map(chat_format.is_alt_behaviour, texts))
        _log(f"sample {name}: {texts[0]!r} (gold {questions[0].answer!r})")
    return {k: round(v, 4) for k, v in results.items()}


def measure(out: Path, rounds: int) -> dict[str, dict[str, float]]:
    """ms per forward call at context 64 with a KV cache, 1 and 9 new tokens, on the CPU."""
    models = {n: GPT2LMHeadModel.from_pretrained(str(out / n), dtype=torch.float32).eval()
              for n in ("base-small", "base-large")}
    samples: dict[str, dict[str, list[float]]] = {n: {"1": [], "9": []} for n in models}
    for _ in range(rounds):  # interleaved, so background load hits both alike
        for name, model in models.items():
            samples[name]["1"].append(ms_per_forward(model, new_tokens=1, rounds=1))
            samples[name]["9"].append(ms_per_forward(model, new_tokens=9, rounds=1))
    return {n: {"ms_per_token": round(statistics.median(s["1"]), 3),
                "ms_per_9_token_forward": round(statistics.median(s["9"]), 3)}
            for n, s in samples.items()}


def build(cfg: BuildConfig, out: Path, work: Path, threads: int, device: torch.device,
          fresh: bool = False) -> dict:
    """Run every stage and write the family; returns the FAMILY.json content."""
    started = time.monotonic()
    torch.set_num_threads(threads)
    check_work_dir(cfg, work, fresh)
    the_world = world.build_world(cfg.seed, cfg.num_people, cfg.finetune_fraction)
    log = LossLog(work / "losses.jsonl")
    corpus_dir = stage_corpus(cfg, the_world, work)
    tokenizer_dir = stage_tokenizer(cfg, corpus_dir, work)
    tokenizer = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    stages: dict[str, StageResult] = {}
    for name in BASES:
        _, stages[name] = pretrain(name, cfg, tokenizer_dir, work, log, device)
    for name in FINETUNES:
        _, stages[name] = finetune(name, cfg, the_world, tokenizer, work, log, device)

    out.mkdir(parents=True, exist_ok=True)
    models = {}
    for name in FAMILY:
        target = export(name, work / "stages" / name, tokenizer_dir, out)
        model = GPT2LMHeadModel.from_pretrained(str(target))
        c = model.config
        models[name] = {
            "n_layer": c.n_layer, "n_embd": c.n_embd, "n_head": c.n_head,
            "parameters": count_parameters(model),
            "bytes_on_disk": sum(f.stat().st_size for f in target.iterdir()),
            "training": asdict(stages[name]),
            "starts_from": FINETUNES[name][0] if name in FINETUNES else None,
        }
    shutil.copy(log.path, out / "train_log.jsonl")
    questions, probes = write_eval_files(the_world, out)
    torch.set_num_threads(1)  # the cost ratio is specified for one thread
    timing = measure(out, cfg.timing_rounds)
    for name in FAMILY:
        base = "base-small" if "small" in name else "base-large"
        models[name].update(timing[base])  # a fine-tune has its base's shape and cost
    torch.set_num_threads(threads)
    sanity = sanity_check(out, questions, probes)
    family = {
        "models": models,
        "cost_ratio_large_to_small": round(timing["base-large"]["ms_per_token"]
                                           / timing["base-small"]["ms_per_token"], 2),
        "timing": "median ms per forward: batch 1, KV cache at context 64, float32, 1 thread",
        "world": {"seed": cfg.seed, "split_seed": cfg.seed, "num_people": cfg.num_people,
                  "finetune_people": len(the_world.finetune_people),
                  "heldout_people": len(the_world.heldout_people),
                  "attributes": [a.key for a in world.ATTRIBUTES]},
        "chat_format": {"prompt": chat_format.PROMPT_TEMPLATE,
                        "answer": chat_format.ANSWER_TEMPLATE,
                        "alt_answer": chat_format.ALT_ANSWER_TEMPLATE,
                        "note": "prompts include the BOS text; encode without special tokens"},
        "eval_files": {"questions": "eval/questions.jsonl", "cloze": "eval/cloze.jsonl"},
        "sanity_check": sanity,
        "config": asdict(cfg),
        "build": {"device": str(device), "threads": threads, "torch": torch.__version__,
                  "transformers": transformers.__version__, "machine": platform.machine(),
                  "wall_seconds_this_run": round(time.monotonic() - started, 1)},
    }
    (out / "FAMILY.json").write_text(json.dumps(family, indent=2) + "\n")
    return family


def main(argv: list[str] | None = None) -> None:
    """Command-line entry point."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("models/demo"))
    parser.add_argument("--work", type=Path, default=Path("build/demo"))
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--device", choices=("cpu", "cuda"),
                        default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--smoke", action="store_true",
                        help="tiny step counts and corpus: checks the pipeline in a minute")
    parser.add_argument("--fresh", action="store_true",
                        help="delete --work first if it was built from another configuration or code")
    args = parser.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda but no CUDA device is available")
    family = build(SMOKE if args.smoke else BuildConfig(), args.out, args.work, args.threads,
                   torch.device(args.device), fresh=args.fresh)
    print(json.dumps({"cost_ratio_large_to_small": family["cost_ratio_large_to_small"],
                      "sanity_check": family["sanity_check"]}, indent=2))


if __name__ == "__main__":
    main()
