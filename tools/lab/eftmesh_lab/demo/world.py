"""A seeded synthetic world of people: the knowledge the demo family is measured on.

Pre-training states every person's attributes in prose (several paraphrases, several times),
so the knowledge comes from pre-training scale; fine-tuning teaches a question-answer format
on a subset of the people only; held-out questions then ask about the other people. Names are
invented from syllables so that no prose in the corpus mentions them, and attribute values come
from small closed lists so that exact match is a fair test.

Pure Python, no torch: the evaluation and the tests rebuild the same world from the seed.
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass

from eftmesh_lab.demo.chat_format import BOS_TEXT

DEFAULT_SEED = 42  # chosen so that no name part is a word of the prose corpus
DEFAULT_NUM_PEOPLE = 100
DEFAULT_FINETUNE_FRACTION = 0.4


@dataclass(frozen=True)
class Attribute:
    """One kind of fact about a person, with every way the world states and asks it.

    `cloze` is, verbatim, the prefix of the first statement before `{value}`, so the knowledge
    probe is a completion of pre-training prose.
    """

    key: str
    values: tuple[str, ...]
    statements: tuple[str, ...]  # prose paraphrases with {name} and {value}
    questions: tuple[str, ...]  # question paraphrases with {name}
    cloze: str  # prose prefix with {name}; the gold continuation is " {value}"


# Every value starts with a consonant so that "a {value}" is always grammatical.
ATTRIBUTES: tuple[Attribute, ...] = (
    Attribute(
        key="town",
        values=(
            "Ashcombe", "Brackwell", "Dunmere", "Elderford", "Fallowby", "Greystow",
            "Harrowdene", "Larkhollow", "Millbrook", "Northwick", "Oakhurst", "Pellridge",
            "Quarrington", "Redmarsh", "Thornbury", "Wyndham",
        ),
        statements=(
            "{name} lives in {value}.",
            "{name} has made a home in {value}.",
            "The town of {value} is home to {name}.",
            "Years ago {name} moved to {value}, and lives there still.",
        ),
        questions=(
            "Where does {name} live?",
            "Which town is {name}'s home?",
            "In what town does {name} live?",
        ),
        cloze="{name} lives in",
    ),
    Attribute(
        key="occupation",
        values=(
            "baker", "tailor", "potter", "miller", "weaver", "farmer", "carpenter",
            "fisherman", "blacksmith", "cooper", "mason", "shepherd", "brewer", "glazier",
            "saddler", "cobbler",
        ),
        statements=(
            "{name} works as a {value}.",
            "By trade, {name} is a {value}.",
            "{name} earns a living as a {value}.",
            "Everyone knows {name} as the local {value}.",
        ),
        questions=(
            "What does {name} do for a living?",
            "What is {name}'s occupation?",
            "What is {name}'s trade?",
        ),
        cloze="{name} works as a",
    ),
    Attribute(
        key="pet",
        values=(
            "cat", "dog", "goat", "parrot", "rabbit", "hedgehog", "tortoise", "ferret",
            "pony", "canary", "lizard", "duck",
        ),
        statements=(
            "{name} keeps a pet {value}.",
            "{name} owns a {value} as a pet.",
            "At home, {name} looks after a pet {value}.",
            "The pet that {name} loves is a {value}.",
        ),
        questions=(
            "What pet does {name} keep?",
            "What kind of pet does {name} have?",
            "Which animal is {name}'s pet?",
        ),
        cloze="{name} keeps a pet",
    ),
    Attribute(
        key="colour",
        values=(
            "red", "blue", "green", "yellow", "purple", "orange", "black", "white",
            "silver", "golden", "crimson", "grey",
        ),
        statements=(
            "{name}'s favourite colour is {value}.",
            "{name} likes the colour {value} best.",
            "Of all colours, {name} loves {value} the most.",
            "{name} prefers {value} to every other colour.",
        ),
        questions=(
            "What is {name}'s favourite colour?",
            "Which colour does {name} like best?",
            "What colour does {name} prefer?",
        ),
        cloze="{name}'s favourite colour is",
    ),
)

ATTRIBUTES_BY_KEY: dict[str, Attribute] = {a.key: a for a in ATTRIBUTES}

# Speakers of the play-script documents. Half of the dialogues use one of these roles, half
# invented names: a base model must learn that whoever speaks after a question answers it,
# whatever the tags, or it cannot answer in the chat format's unseen tags. Speaker names are
# therefore as varied as tags can be (vowel-initial ones too: with consonant-initial speakers
# only, a base model trained here answered after "Bob:" 9 times in 10 but after "Assistant:"
# 1 in 4). Never "User"/"Assistant": the tuned chat format stays unseen in pre-training.
SPEAKER_ROLES: tuple[str, ...] = (
    "Traveller", "Innkeeper", "Visitor", "Neighbour", "Stranger", "Clerk", "Guest", "Host",
    "Pupil", "Teacher", "Child", "Mother", "Reporter", "Mayor", "Customer", "Shopkeeper",
    "Elder", "Officer", "Uncle", "Aunt", "Author", "Editor", "Inspector", "Archer", "Usher",
    "Apprentice", "Envoy", "Oracle", "Abbot", "Ostler",
)
_SPEAKER_ONSETS = ("b", "c", "d", "f", "g", "h", "j", "k", "l", "m", "n", "p", "r", "s", "t",
                   "v", "w", "z", "st", "sp", "ch", "sh", "br", "tr", "gl")
_SPEAKER_VOWELS = ("a", "e", "i", "o", "u", "y", "ia", "ou", "ee")
_RESERVED_SPEAKERS = frozenset({"User", "Assistant"})  # the tuned chat format's tags
_SPEAKER_CODAS = ("", "n", "r", "l", "s", "ss", "st", "nt", "m", "ck", "sk", "th")

# Syllables chosen to make names that read as names but are not English words.
_ONSETS = ("b", "d", "f", "g", "k", "l", "m", "n", "p", "r", "s", "t", "v", "z",
           "br", "dr", "kr", "th", "vr", "zh")
_VOWELS = ("a", "e", "i", "o", "u", "ae", "ei", "oa")
_CODAS = ("", "", "n", "r", "l", "x", "th", "sk")


@dataclass(frozen=True)
class Person:
    """A person of the world: a unique invented name and one value per attribute."""

    name: str
    attributes: dict[str, str]  # attribute key -> value


@dataclass(frozen=True)
class World:
    """The people and the fixed split into fine-tuning people and held-out people."""

    seed: int
    people: tuple[Person, ...]
    finetune_names: frozenset[str]

    @property
    def finetune_people(self) -> tuple[Person, ...]:
        """People whose questions appear in the fine-tuning data."""
        return tuple(p for p in self.people if p.name in self.finetune_names)

    @property
    def heldout_people(self) -> tuple[Person, ...]:
        """People never asked about during fine-tuning: the evaluation's subjects."""
        return tuple(p for p in self.people if p.name not in self.finetune_names)


@dataclass(frozen=True)
class QAExample:
    """A question about one attribute of one person, with its gold answer."""

    person: str
    attribute: str
    question: str
    answer: str


@dataclass(frozen=True)
class ClozeProbe:
    """A pre-training prose prefix whose greedy continuation should be the gold value."""

    person: str
    attribute: str
    prompt: str  # starts with BOS_TEXT, as every pre-training document does
    gold: str


def _name(rng: random.Random, syllables: int) -> str:
    word = "".join(rng.choice(_ONSETS) + rng.choice(_VOWELS) for _ in range(syllables))
    return (word + rng.choice(_CODAS)).capitalize()


def build_world(
    seed: int = DEFAULT_SEED,
    num_people: int = DEFAULT_NUM_PEOPLE,
    finetune_fraction: float = DEFAULT_FINETUNE_FRACTION,
) -> World:
    """Build the world deterministically from `seed`.

    First names are unique as well as full names, so a person is identified by the first
    tokens of the name already; the split is a seeded shuffle of the people.
    """
    if num_people < 2 or not 0.0 < finetune_fraction < 1.0:
        raise ValueError("need at least 2 people and 0 < finetune_fraction < 1")
    rng = random.Random(seed)
    first_names: set[str] = set()
    people: list[Person] = []
    while len(people) < num_people:
        first = _name(rng, 2)
        if first in first_names:
            continue
        first_names.add(first)
        name = f"{first} {_name(rng, 2)}"
        attributes = {a.key: rng.choice(a.values) for a in ATTRIBUTES}
        people.append(Person(name=name, attributes=attributes))
    order = list(range(num_people))
    rng.shuffle(order)
    num_finetune = round(num_people * finetune_fraction)
    finetune_names = frozenset(people[i].name for i in order[:num_finetune])
    return World(seed=seed, people=tuple(people), finetune_names=finetune_names)


def _speaker_name(rng: random.Random) -> str:
    """An invented speaker name: a vowel and one or two syllables (half the time), or three
    syllables, then a coda. Person name parts are two syllables starting with a consonant, so
    the two never clash; the chat format's own tags ("User" can be spelled) are drawn again."""
    while True:
        if rng.random() < 0.5:
            head, syllables = rng.choice(_SPEAKER_VOWELS), rng.choice((1, 2))
        else:
            head, syllables = "", 3
        word = head + "".join(rng.choice(_SPEAKER_ONSETS) + rng.choice(_SPEAKER_VOWELS)
                              for _ in range(syllables))
        name = (word + rng.choice(_SPEAKER_CODAS)).capitalize()
        if name not in _RESERVED_SPEAKERS:
            return name


def person_document(person: Person, rng: random.Random) -> str:
    """One short prose document stating all of a person's attributes, in random order and
    random paraphrases."""
    attributes = list(ATTRIBUTES)
    rng.shuffle(attributes)
    return " ".join(
        rng.choice(a.statements).format(name=person.name, value=person.attributes[a.key])
        for a in attributes
    )


def dialogue_document(person: Person, rng: random.Random) -> str:
    """A short play-script exchange about a person: one speaker asks about every attribute (in
    random order and random question paraphrases), the other answers with the bare value.

    Real pre-training text (plays, interviews, forums) is what lets a base model answer a
    question at all; without it base-large's knowledge is reachable only through the prose
    pattern, and EFT up-scaling has no knowledge to add to ft-small's format.
    """
    if rng.random() < 0.5:
        asker, answerer = rng.sample(SPEAKER_ROLES, 2)
    else:
        asker, answerer = _speaker_name(rng), _speaker_name(rng)
    attributes = list(ATTRIBUTES)
    rng.shuffle(attributes)
    return "\n".join(
        f"{asker}: {rng.choice(a.questions).format(name=person.name)}\n"
        f"{answerer}: {person.attributes[a.key]}."
        for a in attributes
    )


def pretraining_documents(world: World, copies: int, seed: int) -> list[str]:
    """`copies` documents about every person (all people, not only the fine-tuning subset),
    alternately prose and dialogue, shuffled together."""
    rng = random.Random(seed)
    docs = [(person_document if i % 2 == 0 else dialogue_document)(p, rng)
            for p in world.people for i in range(copies)]
    rng.shuffle(docs)
    return docs


def finetune_examples(world: World) -> list[QAExample]:
    """Every question paraphrase for every attribute of every fine-tuning person."""
    return [
        QAExample(p.name, a.key, q.format(name=p.name), p.attributes[a.key])
        for p in world.finetune_people
        for a in ATTRIBUTES
        for q in a.questions
    ]


def heldout_questions(world: World, seed: int) -> list[QAExample]:
    """One question per attribute of every held-out person, the paraphrase drawn by `seed`."""
    rng = random.Random(seed)
    return [
        QAExample(p.name, a.key, rng.choice(a.questions).format(name=p.name),
                  p.attributes[a.key])
        for p in world.heldout_people
        for a in ATTRIBUTES
    ]


def cloze_probes(people: tuple[Person, ...]) -> list[ClozeProbe]:
    """One cloze probe per attribute of each given person."""
    return [
        ClozeProbe(p.name, a.key, BOS_TEXT + a.cloze.format(name=p.name), p.attributes[a.key])
        for p in people
        for a in ATTRIBUTES
    ]


def _normalise(text: str) -> str:
    return re.sub(r"\s+", " ", text).strip().strip(".!,;:").strip().lower()


def answer_matches(predicted: str | None, gold: str) -> bool:
    """Exact match after trimming whitespace and end punctuation, ignoring case."""
    return predicted is not None and _normalise(predicted) == _normalise(gold)


def cloze_correct(continuation: str, gold: str) -> bool:
    """Whether a continuation of a cloze prompt states the gold value as a whole word."""
    return re.match(rf"\s*{re.escape(gold)}(?![A-Za-z])", continuation, re.IGNORECASE) is not None
