"""A slice of `make eval` on the shipped demo family, through the real mesh (five logit
services and a combiner): the orderings the full evaluation showed (eval/results.json) must
hold on a sample of held-out questions."""

from __future__ import annotations

from pathlib import Path

import pytest

from eftmesh.demo.evaluate import run

MODELS = Path(__file__).resolve().parents[2] / "models" / "demo"


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    return run(MODELS, limit=24, port=50650, log_dir=tmp_path_factory.mktemp("eval-logs"), verbose=False)


def test_pre_training_scale_brings_knowledge(results):
    assert results["cloze"]["base-large"] >= results["cloze"]["base-small"] + 0.5


def test_fine_tuning_teaches_the_format_and_the_base_models_ignore_it(results):
    s = results["systems"]
    assert s["ft-small"]["format_compliance"] >= 0.9
    assert s["ft-large"]["format_compliance"] >= 0.9
    assert s["base-small"]["format_compliance"] < 0.2
    assert s["base-large"]["format_compliance"] < 0.2


def test_eft_keeps_the_tuned_format(results):
    s = results["systems"]
    assert s["EFT up-scaling"]["format_compliance"] >= 0.8 * s["ft-small"]["format_compliance"]
    assert s["EFT down-scaling"]["format_compliance"] >= 0.9 * s["ft-large"]["format_compliance"]


def test_the_large_fine_tune_carries_knowledge_into_down_scaling(results):
    s = results["systems"]
    assert s["ft-large"]["accuracy"] > s["ft-small"]["accuracy"] + 0.5
    assert s["EFT down-scaling"]["accuracy"] > s["ft-small"]["accuracy"] + 0.5


def test_interpolation_moves_from_the_alt_behaviour_to_the_tuned_format(results):
    i = results["interpolation"]
    assert i["0"]["alt_behaviour"] >= 0.8 and i["1"]["alt_behaviour"] <= 0.1
    assert i["1"]["format_compliance"] >= 0.8 and i["0"]["format_compliance"] <= 0.1
