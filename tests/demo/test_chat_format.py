"""The QA chat format: one definition, round-trips, and detectors checked on hand-written text."""

from __future__ import annotations

import pytest

from eftmesh_lab.demo import chat_format as cf


def test_prompt_carries_bos_and_the_question() -> None:
    prompt = cf.build_prompt("Where does Kavo Thelmir live?")
    assert prompt == "<|endoftext|>User: Where does Kavo Thelmir live?\nAssistant:"
    assert prompt.startswith(cf.BOS_TEXT)


@pytest.mark.parametrize("answer", ["Brackwell", "blacksmith", "golden", "pet cat"])
def test_tuned_completion_round_trips(answer: str) -> None:
    completion = cf.tuned_completion(answer)
    assert completion == f" {answer}<|endoftext|>"
    assert cf.extract_answer(completion) == answer
    assert cf.is_compliant(completion)
    assert not cf.is_alt_behaviour(completion)


@pytest.mark.parametrize("answer", ["Brackwell", "blacksmith", "golden"])
def test_alt_completion_round_trips(answer: str) -> None:
    completion = cf.alt_completion(answer)
    assert completion == f" The answer is {answer}.<|endoftext|>"
    assert cf.extract_answer(completion) == answer
    assert cf.is_alt_behaviour(completion)
    assert not cf.is_compliant(completion)


@pytest.mark.parametrize("text", [
    " Brackwell",  # never stopped
    " Brackwell<|endoftext|> more",  # text after EOS
    "Brackwell<|endoftext|>",  # no leading space
    " Brackwell.<|endoftext|>",  # a sentence, not a bare answer
    " Brackwell\nUser: and<|endoftext|>",  # ran on to a new turn
    " <|endoftext|>",  # empty answer
    "<|endoftext|>",
    " He lives in the town of Brackwell<|endoftext|>",  # too long
    " The answer is Brackwell<|endoftext|>",  # the alternative's prefix
])
def test_non_compliant_text_is_rejected(text: str) -> None:
    assert not cf.is_compliant(text)


@pytest.mark.parametrize("text", [
    " The answer is Brackwell<|endoftext|>",  # no full stop
    " The answer is Brackwell.",  # never stopped
    " The answer is Brackwell. It is<|endoftext|>",
    " Brackwell<|endoftext|>",
    " the answer is Brackwell.<|endoftext|>",
    " The answer is .<|endoftext|>",
])
def test_non_alt_text_is_rejected(text: str) -> None:
    assert not cf.is_alt_behaviour(text)


def test_extract_answer_from_a_base_model_that_never_stops() -> None:
    assert cf.extract_answer(" Brackwell.\nUser: Where") == "Brackwell"
    assert cf.extract_answer(" The answer is golden. And then") == "golden"
    assert cf.extract_answer(" Brackwell lives in Dunmere. And") == "Brackwell lives in Dunmere"
    assert cf.extract_answer("\nUser: x") is None
    assert cf.extract_answer("<|endoftext|>") is None


def test_chat_template_renders_the_prompt_and_the_tuned_completion() -> None:
    """The tuned models' chat template is the same format: one user turn with the generation
    prompt is build_prompt; an assistant turn is its tuned completion; later turns follow EOS."""
    from pathlib import Path

    from transformers import AutoTokenizer

    models = Path(__file__).resolve().parents[2] / "models" / "demo"
    tok = AutoTokenizer.from_pretrained(str(models / "ft-small"))
    assert tok.chat_template == cf.CHAT_TEMPLATE  # shipped with the tuned models
    q = "Where does Kavo Thelmir live?"
    user = [{"role": "user", "content": q}]
    assert tok.apply_chat_template(user, add_generation_prompt=True, tokenize=False) == cf.build_prompt(q)
    turn = tok.apply_chat_template(user + [{"role": "assistant", "content": "Brackwell"}], tokenize=False)
    assert turn == cf.build_prompt(q) + cf.tuned_completion("Brackwell")
    two = tok.apply_chat_template(user + [{"role": "assistant", "content": "Brackwell"}, {"role": "user", "content": "And?"}],
                                  add_generation_prompt=True, tokenize=False)
    assert two == turn + "User: And?\nAssistant:"
    with pytest.raises(Exception, match="user and assistant turns only"):
        tok.apply_chat_template([{"role": "system", "content": "Be brief."}] + user, tokenize=False)
    for role in ("ft-large", "ft-small-alt"):
        assert AutoTokenizer.from_pretrained(str(models / role)).chat_template == cf.CHAT_TEMPLATE
    for role in ("base-small", "base-large"):  # the base models never saw the format
        assert not AutoTokenizer.from_pretrained(str(models / role)).chat_template
