"""The one definition of the demo family's question-answer chat format, and its alternative.

Tuned format (ft-small, ft-large), as text, where BOS_TEXT is the tokenizer's single special
token `<|endoftext|>` (id 0, which is also EOS and padding):

    <|endoftext|>User: Where does Kavo Thelmir live?\\nAssistant: Brackwell<|endoftext|>
    \\______________________ prompt ______________________/\\____ completion ____/

The completion is one space, the bare answer, and EOS right after it: the answer ends where it
should. The alternative behaviour (ft-small-alt) answers the same prompt with a full sentence,

    Assistant: The answer is Brackwell.<|endoftext|>

so an interpolation between ft-small and ft-small-alt can be measured as the rate of completions
that begin with "The answer is". Pre-training documents never contain "User:" or "Assistant:".

Completions are text decoded from generated ids with special tokens kept, so EOS shows as
BOS_TEXT. Pure functions, no torch.
"""

from __future__ import annotations

import re

BOS_TEXT = "<|endoftext|>"
EOS_TEXT = BOS_TEXT
PROMPT_TEMPLATE = BOS_TEXT + "User: {question}\nAssistant:"
ANSWER_TEMPLATE = " {answer}" + EOS_TEXT
ALT_PREFIX = "The answer is "
ALT_ANSWER_TEMPLATE = " " + ALT_PREFIX + "{answer}." + EOS_TEXT

# A tuned answer is a short phrase: at most this many words, on one line.
MAX_ANSWER_WORDS = 4

_TUNED = re.compile(r" (?P<answer>[^\s<.][^\n<.]*?)" + re.escape(EOS_TEXT))
_ALT = re.compile(" " + re.escape(ALT_PREFIX) + r"(?P<answer>[^\n<.]+)\." + re.escape(EOS_TEXT))


def build_prompt(question: str) -> str:
    """The prompt for a question, BOS included: encode it without adding special tokens."""
    return PROMPT_TEMPLATE.format(question=question)


def tuned_completion(answer: str) -> str:
    """The completion the tuned models are trained to produce for `answer`."""
    return ANSWER_TEMPLATE.format(answer=answer)


def alt_completion(answer: str) -> str:
    """The completion ft-small-alt is trained to produce for `answer`."""
    return ALT_ANSWER_TEMPLATE.format(answer=answer)


def extract_answer(completion: str) -> str | None:
    """The answer stated by a completion of any style, or None if it states nothing.

    Reads the first sentence: up to EOS, newline or full stop, whichever comes first, so the
    base models, which never stop, are judged on what they say first; then drops the
    alternative prefix and end punctuation. Answers in this world never contain a full stop.
    """
    text = re.split(r"<\|endoftext\|>|\n|\.", completion, maxsplit=1)[0].strip()
    if text.startswith(ALT_PREFIX):
        text = text[len(ALT_PREFIX):]
    text = text.strip().rstrip("!,;:?").strip()
    return text or None


def is_compliant(completion: str) -> bool:
    """Whether a completion follows the tuned format: a space, a short one-line answer and EOS,
    with nothing after EOS (generation stopped where it should)."""
    match = _TUNED.fullmatch(completion)
    return (
        match is not None
        and not match.group("answer").startswith(ALT_PREFIX)
        and len(match.group("answer").split()) <= MAX_ANSWER_WORDS
    )


def is_alt_behaviour(completion: str) -> bool:
    """Whether a completion follows the alternative format: a full sentence "The answer is X."
    and EOS, with nothing after EOS."""
    match = _ALT.fullmatch(completion)
    return match is not None and len(match.group("answer").split()) <= MAX_ANSWER_WORDS


# The tuned models' chat template (Jinja, as transformers' apply_chat_template reads it): a
# conversation of user and assistant turns in exactly the format above. One user turn with the
# generation prompt renders `build_prompt(question)`; an assistant turn renders its tuned
# completion. Later user turns follow the previous answer's EOS, which is also BOS here, so
# BOS is written once, before the first turn. The end of an assistant turn is EOS.
CHAT_TEMPLATE = (
    "{%- for message in messages -%}"
    "{%- if loop.first -%}{{ bos_token }}{%- endif -%}"
    "{%- if message['role'] == 'user' -%}"
    "{{ 'User: ' + message['content'] }}"
    "{%- elif message['role'] == 'assistant' -%}"
    "{{ '\\nAssistant: ' + message['content'] + eos_token }}"
    "{%- else -%}"
    "{{ raise_exception('the demo family knows user and assistant turns only, not ' + message['role']) }}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '\\nAssistant:' }}{%- endif -%}"
)
