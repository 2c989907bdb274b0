"""A slice of `make eval` on the shipped demo family, through the real mesh (five logit
services and a combiner): the orderings the full evaluation showed (eval/results.json) must
hold on a sample of held-out questions."""

from __future__ import annotations

from pathlib import Path

import pytest

from conftest import free_port_block
from eftmesh_lab.demo.evaluate import run

MODELS = Path(__file__).resolve().parents[2] / "models" / "demo"

# six service processes on loopback; about 30 s
pytestmark = [pytest.mark.slow, pytest.mark.e2e]


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    return run(MODELS, limit=24, port=free_port_block(6), log_dir=tmp_path_factory.mktemp("eval-logs"), verbose=False)


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


def test_knowledge_follows_pre_training_scale_not_fine_tuning_scale(results):
    # the 2x2 of the full run: the large-pre-training row answers (ft-large 0.77, EFT up 0.77),
    # the small-pre-training row does not (ft-small 0.06, EFT down 0.02)
    s = results["systems"]
    assert s["ft-large"]["accuracy"] > s["ft-small"]["accuracy"] + 0.5
    assert s["EFT up-scaling"]["accuracy"] > s["ft-small"]["accuracy"] + 0.5
    assert s["EFT down-scaling"]["accuracy"] < s["EFT up-scaling"]["accuracy"] - 0.5


def test_eft_up_scaling_meets_the_issue_targets_on_the_slice(results):
    # at least 2x ft-small's accuracy and 0.8x base-large's cloze accuracy, format at least
    # 0.9x ft-small's (full run: 12.3x, 0.91x, 0.99x)
    s, up = results["systems"], results["systems"]["EFT up-scaling"]
    assert up["accuracy"] >= 2 * s["ft-small"]["accuracy"]
    assert up["accuracy"] >= 0.8 * results["cloze"]["base-large"]
    assert up["format_compliance"] >= 0.9 * s["ft-small"]["format_compliance"]


def test_interpolation_moves_from_the_alt_behaviour_to_the_tuned_format(results):
    i = results["interpolation"]
    assert i["0"]["alt_behaviour"] >= 0.8 and i["1"]["alt_behaviour"] <= 0.1
    assert i["1"]["format_compliance"] >= 0.8 and i["0"]["format_compliance"] <= 0.1
