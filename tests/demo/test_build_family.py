"""The family build end to end with tiny step counts (`--smoke`): about a minute on one core.

It needs the Debian prose packages (see corpus.py) and is skipped, saying so, without them.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch
from transformers import AutoTokenizer, GPT2LMHeadModel

from eftmesh_lab.demo import build_family, corpus, world

# trains the whole smoke family: about a minute
pytestmark = [pytest.mark.slow]


@pytest.fixture(scope="module")
def smoke_family(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, dict]:
    try:
        corpus.ensure_packages(install=False)
    except corpus.CorpusUnavailable as exc:
        pytest.skip(str(exc))
    root = tmp_path_factory.mktemp("family")
    out, work = root / "models", root / "work"
    family = build_family.build(build_family.SMOKE, out, work, threads=1,
                                device=torch.device("cpu"))
    return out, work, family


def test_every_model_loads_alone_with_the_shared_tokenizer(smoke_family) -> None:
    out, _, _ = smoke_family
    vocab = None
    for name in build_family.FAMILY:
        model = GPT2LMHeadModel.from_pretrained(str(out / name))
        tokenizer = AutoTokenizer.from_pretrained(str(out / name))
        assert model.dtype == torch.float16
        assert model.config.bos_token_id == model.config.eos_token_id == 0
        assert tokenizer.eos_token_id == tokenizer.bos_token_id == tokenizer.pad_token_id == 0
        assert (out / name / "model.safetensors").exists()
        vocab = vocab or tokenizer.get_vocab()
        assert tokenizer.get_vocab() == vocab


def test_family_json_and_eval_files_describe_the_family(smoke_family) -> None:
    out, _, family = smoke_family
    assert json.loads((out / "FAMILY.json").read_text()) == family
    assert set(family["models"]) == set(build_family.FAMILY)
    assert family["models"]["base-large"]["n_layer"] > family["models"]["base-small"]["n_layer"]
    the_world = world.build_world(family["world"]["seed"], family["world"]["num_people"])
    questions = [json.loads(line) for line in (out / "eval/questions.jsonl").open()]
    assert {q["person"] for q in questions} == {p.name for p in the_world.heldout_people}
    cloze = [json.loads(line) for line in (out / "eval/cloze.jsonl").open()]
    assert len(cloze) == len(the_world.people) * len(world.ATTRIBUTES)
    assert (out / "train_log.jsonl").read_text().count('"stage": "ft-small-alt"') >= 1


def test_a_rerun_resumes_from_the_finished_stages(smoke_family) -> None:
    out, work, _ = smoke_family
    stamp = (work / "stages" / "base-large" / "stage.json").stat().st_mtime_ns
    build_family.build(build_family.SMOKE, out, work, threads=1, device=torch.device("cpu"))
    assert (work / "stages" / "base-large" / "stage.json").stat().st_mtime_ns == stamp


def test_a_work_dir_from_another_build_is_refused_or_deleted_with_fresh(smoke_family, tmp_path) -> None:
    out, work, _ = smoke_family
    other = dataclasses.replace(build_family.SMOKE, seed=1)
    stamp = (work / "BUILD_KEY.json").read_text()
    with pytest.raises(SystemExit, match="config differ.*--fresh"):
        build_family.check_work_dir(other, work, fresh=False)
    assert (work / "BUILD_KEY.json").read_text() == stamp  # refused: nothing touched
    # a work dir from before build keys existed is refused too
    old = tmp_path / "old"
    (old / "stages").mkdir(parents=True)
    with pytest.raises(SystemExit, match="records no build key"):
        build_family.check_work_dir(build_family.SMOKE, old, fresh=False)
    build_family.check_work_dir(build_family.SMOKE, old, fresh=True)
    assert not (old / "stages").exists()
    assert json.loads((old / "BUILD_KEY.json").read_text()) == build_family.build_key(build_family.SMOKE)
