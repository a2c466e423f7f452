"""Alpaca and ShareGPT records as canonical chat records (registered with ``register_data_formats``).

OpenAI ``messages`` and ``prompt``/``chosen``/``rejected`` are already built-in formats
(``rayalign_formats``); with these two, every common public SFT format loads everywhere a chat
file is read (``sft``, ``curate``, ``generate``...), not only in curation.
"""

from __future__ import annotations

from rayalign.data.formats import DataFormat, as_messages

# ShareGPT speakers as they occur in the wild, mapped to chat roles.
SHAREGPT_ROLES = {
    "system": "system",
    "human": "user", "user": "user",
    "gpt": "assistant", "assistant": "assistant", "chatgpt": "assistant", "bard": "assistant",
    "bing": "assistant", "model": "assistant",
}


def alpaca(record: dict) -> dict:
    """``instruction`` (+ ``input`` as context after a blank line) -> user; ``output`` -> assistant.

    An optional ``system`` field becomes the system message.
    """
    instruction, context = record["instruction"], record.get("input") or ""
    if not isinstance(instruction, str) or not isinstance(context, str):
        raise ValueError("field 'instruction'/'input': expected strings")
    prompt = instruction + ("\n\n" + context if context.strip() else "")
    system = as_messages(record["system"], "system", "system") if record.get("system") else []
    return {"messages": system + as_messages(prompt, "instruction", "user")
            + as_messages(record["output"], "output", "assistant")}


def sharegpt(record: dict) -> dict:
    turns = record["conversations"]
    if not isinstance(turns, list) or not turns:
        raise ValueError("field 'conversations': expected a non-empty list of turns")
    messages = []
    for i, turn in enumerate(turns):
        if not isinstance(turn, dict):
            raise ValueError(f"field 'conversations[{i}]': expected a turn object")
        speaker = turn.get("from")
        role = SHAREGPT_ROLES.get(str(speaker).lower())
        if role is None:
            raise ValueError(f"field 'conversations[{i}].from': expected one of {', '.join(SHAREGPT_ROLES)}, "
                             f"got {speaker!r}")
        messages.append({"role": role, "content": turn.get("value")})
    if record.get("system"):
        messages.insert(0, {"role": "system", "content": record["system"]})
    messages = as_messages(messages, "conversations", "user")
    if not any(m["role"] == "assistant" for m in messages):
        raise ValueError("field 'conversations': no assistant (gpt) turn to train on")
    return {"messages": messages}


FORMATS = [
    DataFormat("alpaca_instruction", "chat", ("instruction", "output"), alpaca),
    DataFormat("sharegpt", "chat", ("conversations",), sharegpt),
]
