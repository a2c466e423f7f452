"""Built-in dataset formats: OpenAI messages, prompt/completion, preference pairs and unpaired (KTO) examples."""

from __future__ import annotations

from rayalign.data.formats import DataFormat, as_messages
from rayalign.data.validation import RecordProblem
from rayalign.hookspecs import hookimpl


def _messages(record: dict) -> dict:
    # The loader checks that a chat record ends with the assistant (for every chat format).
    return {"messages": as_messages(record["messages"], "messages", "user")}


def _prompt_completion(record: dict) -> dict:
    return {
        "messages": as_messages(record["prompt"], "prompt", "user")
        + as_messages(record["completion"], "completion", "assistant")
    }


def _preference(record: dict) -> dict:
    return {
        "prompt": as_messages(record["prompt"], "prompt", "user"),
        "chosen": as_messages(record["chosen"], "chosen", "assistant"),
        "rejected": as_messages(record["rejected"], "rejected", "assistant"),
    }


def _unpaired(record: dict) -> dict:
    label = record["label"]
    if not isinstance(label, bool):  # 1, "yes" or "good" would each mean something else to someone
        raise RecordProblem("wrong_type", f"field 'label': expected true (desirable) or false, got {label!r}")
    return {
        "prompt": as_messages(record["prompt"], "prompt", "user"),
        "completion": as_messages(record["completion"], "completion", "assistant"),
        "label": label,
    }


def _prompt(record: dict) -> dict:
    out = {"prompt": as_messages(record["prompt"], "prompt", "user")}
    if "reference" in record:
        out["reference"] = str(record["reference"])
    return out


@hookimpl
def register_data_formats(register):
    register(DataFormat("messages", "chat", ("messages",), _messages))
    register(DataFormat("prompt_completion", "chat", ("prompt", "completion"), _prompt_completion))
    register(DataFormat("preference", "preference", ("prompt", "chosen", "rejected"), _preference))
    register(DataFormat("unpaired", "unpaired", ("prompt", "completion", "label"), _unpaired))
    register(DataFormat("prompt", "prompt", ("prompt",), _prompt))
