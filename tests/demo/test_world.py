"""The synthetic world: deterministic, a clean split, and probes that ask what the prose says."""

from __future__ import annotations

import random

from eftmesh_lab.demo import world
from eftmesh_lab.demo.chat_format import BOS_TEXT


def test_world_is_deterministic_for_a_seed() -> None:
    assert world.build_world(7) == world.build_world(7)
    assert world.build_world(7) != world.build_world(8)
    docs = world.pretraining_documents(world.build_world(7), copies=3, seed=1)
    assert docs == world.pretraining_documents(world.build_world(7), copies=3, seed=1)


def test_names_are_unique_and_values_come_from_the_closed_lists() -> None:
    w = world.build_world()
    assert len({p.name for p in w.people}) == len(w.people)
    assert len({p.name.split()[0] for p in w.people}) == len(w.people)
    for person in w.people:
        assert set(person.attributes) == set(world.ATTRIBUTES_BY_KEY)
        for key, value in person.attributes.items():
            assert value in world.ATTRIBUTES_BY_KEY[key].values


def test_finetune_and_heldout_people_are_disjoint_and_cover_the_world() -> None:
    w = world.build_world(num_people=100, finetune_fraction=0.4)
    finetune = {p.name for p in w.finetune_people}
    heldout = {p.name for p in w.heldout_people}
    assert len(finetune) == 40 and len(heldout) == 60
    assert not finetune & heldout
    assert finetune | heldout == {p.name for p in w.people}


def test_finetune_examples_are_only_about_the_finetune_people() -> None:
    w = world.build_world()
    examples = world.finetune_examples(w)
    assert {e.person for e in examples} == set(w.finetune_names)
    per_person = sum(len(a.questions) for a in world.ATTRIBUTES)
    assert len(examples) == per_person * len(w.finetune_people)


def test_eval_questions_are_only_about_heldout_people_with_their_gold_answers() -> None:
    w = world.build_world()
    people = {p.name: p for p in w.people}
    questions = world.heldout_questions(w, seed=w.seed)
    assert {q.person for q in questions} == {p.name for p in w.heldout_people}
    assert len(questions) == len(w.heldout_people) * len(world.ATTRIBUTES)
    for q in questions:
        assert q.person not in w.finetune_names
        assert q.person in q.question
        assert q.answer == people[q.person].attributes[q.attribute]


def test_pretraining_documents_state_every_fact_of_every_person() -> None:
    w = world.build_world(num_people=10)
    docs = world.pretraining_documents(w, copies=2, seed=0)
    assert len(docs) == 20
    for person in w.people:
        about = [d for d in docs if person.name in d]
        assert len(about) == 2
        for doc in about:
            for value in person.attributes.values():
                assert value in doc


def test_pretraining_alternates_prose_and_dialogue_without_the_chat_format() -> None:
    w = world.build_world(num_people=10)
    docs = world.pretraining_documents(w, copies=4, seed=0)
    dialogues = [d for d in docs if "\n" in d]
    assert len(dialogues) == len(docs) // 2
    for doc in docs:
        assert "User:" not in doc and "Assistant:" not in doc and BOS_TEXT not in doc


def test_dialogue_answers_every_question_with_the_bare_value() -> None:
    person = world.build_world(num_people=2).people[0]
    lines = world.dialogue_document(person, random.Random(0)).split("\n")
    assert len(lines) == 2 * len(world.ATTRIBUTES)
    answers = {line.split(": ", 1)[1].rstrip(".") for line in lines[1::2]}
    assert answers == set(person.attributes.values())
    assert all(person.name in line for line in lines[0::2])


def test_cloze_prompts_are_prefixes_of_pretraining_prose() -> None:
    w = world.build_world(num_people=5)
    for probe in world.cloze_probes(w.people):
        attribute = world.ATTRIBUTES_BY_KEY[probe.attribute]
        sentence = attribute.statements[0].format(name=probe.person, value=probe.gold)
        assert probe.prompt.startswith(BOS_TEXT)
        assert sentence.startswith(probe.prompt[len(BOS_TEXT):] + " " + probe.gold)


def test_every_statement_and_question_names_the_person() -> None:
    for attribute in world.ATTRIBUTES:
        assert attribute.statements[0].startswith(attribute.cloze + " {value}")
        for template in attribute.statements:
            assert "{name}" in template and "{value}" in template
        for template in attribute.questions:
            assert "{name}" in template and "{value}" not in template


def test_person_document_uses_the_given_rng() -> None:
    person = world.build_world(num_people=2).people[0]
    assert (world.person_document(person, random.Random(3))
            == world.person_document(person, random.Random(3)))


def test_answer_matching_ignores_case_space_and_end_punctuation() -> None:
    assert world.answer_matches(" Brackwell.", "Brackwell")
    assert world.answer_matches("brackwell", "Brackwell")
    assert not world.answer_matches("Brackwell Fen", "Brackwell")
    assert not world.answer_matches(None, "Brackwell")


def test_cloze_correct_needs_the_gold_as_a_whole_word() -> None:
    assert world.cloze_correct(" Dunmere. He", "Dunmere")
    assert world.cloze_correct(" dunmere", "Dunmere")
    assert not world.cloze_correct(" Dunmeres", "Dunmere")
    assert not world.cloze_correct(" the town of Dunmere", "Dunmere")
    assert world.cloze_correct(" cat<|endoftext|>", "cat")


class _ScriptedRandom:
    """A stand-in for random.Random that returns scripted draws, to force a given name."""

    def __init__(self, randoms: list[float], choices: list[object]) -> None:
        self._randoms, self._choices = list(randoms), list(choices)

    def random(self) -> float:
        return self._randoms.pop(0)

    def choice(self, options):
        value = self._choices.pop(0)
        assert value in options
        return value


def test_an_invented_speaker_is_never_a_chat_format_tag() -> None:
    # first draw spells "User" (vowel head "u", one syllable "se", coda "r"): it is drawn again
    rng = _ScriptedRandom([0.1, 0.9], ["u", 1, "s", "e", "r", "t", "a", "l", "o", "m", "i", "n"])
    assert world._speaker_name(rng) == "Talomin"
