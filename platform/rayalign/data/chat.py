"""Chat-template tokenization with a token-exact mask of the assistant's tokens.

The mask is found by rendering the conversation up to each assistant turn with and without that
turn: the tokens in between are the assistant's. This works for any chat template (ours, Qwen's,
Llama's) without ``{% generation %}`` markers, and we check that every prefix tokenizes to a
prefix of the whole conversation, so a template for which that is false fails loudly instead of
silently shifting the mask.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from rayalign.data.labels import IGNORE_INDEX
from rayalign.errors import DataError


@dataclass(eq=False, slots=True)
class Tokenized:
    """One sequence's ids and labels as int32 arrays: 4 bytes a token each, not a list's pointer and int.

    Lists given are converted; int32 arrays are kept as they are, so the token cache hands out views
    of one flat buffer (``token_cache.load``). Compare with ``==`` on two ``Tokenized`` (element-wise
    equality of both arrays), and with ``.tolist()`` against a list.
    """

    input_ids: np.ndarray
    labels: np.ndarray  # IGNORE_INDEX where no loss is taken

    def __post_init__(self) -> None:
        self.input_ids = np.asarray(self.input_ids, dtype=np.int32)
        self.labels = np.asarray(self.labels, dtype=np.int32)

    def __len__(self) -> int:
        return len(self.input_ids)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Tokenized):
            return NotImplemented
        return bool(np.array_equal(self.input_ids, other.input_ids) and np.array_equal(self.labels, other.labels))

    __hash__ = None  # type: ignore[assignment]  # mutable, as the list version was

    @property
    def num_trained(self) -> int:
        return int(np.count_nonzero(self.labels != IGNORE_INDEX))


def render_chat(tokenizer, messages: list[dict], add_generation_prompt: bool) -> list[int]:
    """Token ids of ``messages`` through the tokenizer's chat template (rendered as text, then
    tokenized without adding special tokens: the template places its own)."""
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def tokenize_conversation(tokenizer, messages: list[dict], max_length: int | None, where: str = "conversation") -> Tokenized:
    """Token ids of the whole conversation; labels are the ids on assistant turns only.

    ``max_length`` truncates; stages pass None and treat a longer example as a bad record
    (``validation.within_max_length``), so nothing is cut silently.
    """
    input_ids = render_chat(tokenizer, messages, add_generation_prompt=False)
    labels = [IGNORE_INDEX] * len(input_ids)
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        before = render_chat(tokenizer, messages[:i], add_generation_prompt=True)
        through = render_chat(tokenizer, messages[: i + 1], add_generation_prompt=False)
        if input_ids[: len(before)] != before or input_ids[: len(through)] != through:
            raise DataError(where, "the chat template does not render a prefix of the conversation as a token prefix")
        labels[len(before) : len(through)] = through[len(before) :]
    if max_length is not None and len(input_ids) > max_length:
        input_ids, labels = input_ids[:max_length], labels[:max_length]
    return Tokenized(input_ids, labels)


def tokenize_prompt(tokenizer, prompt: list[dict]) -> list[int]:
    """The prompt rendered with the generation prompt, ready for the model to answer."""
    return render_chat(tokenizer, prompt, add_generation_prompt=True)


def tokenize_completion(
    tokenizer, prompt: list[dict], completion: list[dict], max_length: int | None, where: str = "pair"
) -> Tokenized:
    """A prompt followed by its completion; only the completion's assistant tokens are labelled."""
    tokenized = tokenize_conversation(tokenizer, prompt + completion, max_length=max_length, where=where)
    prompt_len = len(tokenize_prompt(tokenizer, prompt))
    # Assistant turns inside the prompt (few-shot history) are context, not what is preferred.
    labels = tokenized.labels.copy()
    labels[:prompt_len] = IGNORE_INDEX
    return Tokenized(tokenized.input_ids, labels)
