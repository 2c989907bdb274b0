"""Chat: a conversation rendered with a model's chat template, and where its turn ends.

A request may send `messages` instead of `prompt`. The combiner renders them with the Jinja
chat template of one role's model (the template travels in that logit service's Info, so each
model keeps its own: a base model usually has none, a tuned one does), adds the assistant's
generation prompt, and tokenises the text without adding special tokens (the template writes
BOS itself where it wants one), as transformers' `apply_chat_template(tokenize=True)` does.

Generation then also stops at the template's end-of-turn token: `<|im_end|>` for ChatML,
`<|eot_id|>` for Llama 3, the tokenizer's EOS for templates that end turns with it. It is
found from the template itself (render a user turn and an assistant turn, and take the special
token that follows the assistant's text), so no model-specific table is needed; the tokenizer's
EOS always counts too.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

# Bounds on a conversation (INVALID_ARGUMENT beyond them). Its rendered text is bounded by the
# prompt-length rule of `decoding.encode_prompt` as well; these keep the template engine's work
# small before that.
MAX_MESSAGES = 1024
MAX_CHAT_ROLE_CHARS = 64

_SENTINEL = "\u2063eftmesh-end-of-turn-probe\u2063"


@dataclass(frozen=True)
class ChatMessage:
    """One turn: who speaks and what was said."""

    role: str
    content: str

    def __post_init__(self) -> None:
        if not self.role:
            raise ValueError("a message's role is empty: use system, user or assistant")
        if len(self.role) > MAX_CHAT_ROLE_CHARS:
            raise ValueError(f"a message's role is {len(self.role)} characters; at most {MAX_CHAT_ROLE_CHARS}")


def check_messages(messages: Sequence[ChatMessage]) -> None:
    """ValueError for a conversation no template should be asked to render."""
    if len(messages) > MAX_MESSAGES:
        raise ValueError(f"messages has {len(messages)} turns; at most {MAX_MESSAGES} are allowed")


class TemplateError(ValueError):
    """The chat template refused the conversation (e.g. roles that do not alternate)."""


def render(tokenizer: Any, template: str, messages: Sequence[ChatMessage]) -> str:
    """The conversation as prompt text, the assistant's generation prompt added."""
    try:
        text = tokenizer.apply_chat_template(
            [{"role": m.role, "content": m.content} for m in messages],
            chat_template=template, add_generation_prompt=True, tokenize=False,
        )
    except Exception as e:  # jinja2's TemplateError (raise_exception in the template), or a bug in it
        raise TemplateError(f"the chat template refused these messages: {e}") from None
    if not isinstance(text, str):  # batched or dict output: not a template of one conversation
        raise TemplateError("the chat template did not render one string")
    return text


def end_of_turn_ids(tokenizer: Any, template: str) -> frozenset[int]:
    """Token ids that end an assistant turn under `template`, plus the tokenizer's EOS.

    Renders [user, assistant(SENTINEL)] and takes the first special token after the sentinel;
    a template that cannot render that (it demands a system turn, say) gives EOS alone.
    """
    ids = {tokenizer.eos_token_id} if tokenizer.eos_token_id is not None else set()
    try:
        text = tokenizer.apply_chat_template(
            [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": _SENTINEL}],
            chat_template=template, tokenize=False,
        )
    except Exception:
        return frozenset(ids)
    if not isinstance(text, str) or _SENTINEL not in text:
        return frozenset(ids)
    tail = text.split(_SENTINEL, 1)[1]
    special = set(getattr(tokenizer, "all_special_ids", ())) | {
        i for i, t in getattr(tokenizer, "added_tokens_decoder", {}).items() if getattr(t, "special", False)
    }
    for token in tokenizer.encode(tail, add_special_tokens=False):
        if token in special:
            ids.add(token)
            break
    return frozenset(ids)


class ChatTemplates:
    """Each role's chat template and end-of-turn ids, over the combiner's shared tokenizer (the
    roles share its vocabulary: the fingerprint check guarantees it)."""

    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer = tokenizer
        self._eot: dict[str, frozenset[int]] = {}

    def end_of_turn(self, template: str) -> frozenset[int]:
        if template not in self._eot:
            self._eot[template] = end_of_turn_ids(self.tokenizer, template)
        return self._eot[template]

    def render(self, template: str, messages: Sequence[ChatMessage]) -> tuple[str, frozenset[int]]:
        """Prompt text and the ids that end the assistant's turn."""
        return render(self.tokenizer, template, messages), self.end_of_turn(template)
