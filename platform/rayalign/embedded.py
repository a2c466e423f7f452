"""The embedded default: a tiny Llama-style model and tokenizer built locally, no hub needed.

The tokenizer is a byte-level BPE trained on the synthetic world's text, with a small chat
template. The model has head_dim 64 because vLLM's CPU attention rejects 16. Both are written
once into a cache directory (atomically, so a killed build never leaves half a model) and are
loadable by ``transformers`` and by vLLM like any hub checkpoint.

Besides the tiny default there are larger random-initialised shapes (``EMBEDDED_SHAPES``) with
the same tokenizer, for training a model of the synthetic world from scratch on a GPU:
``model: embedded:knowledge/qwen2-100m``.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path

CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "<|{{ message['role'] }}|>\n{{ message['content'] }}<|end|>"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)
SPECIAL_TOKENS = ["<|pad|>", "<|bos|>", "<|end|>", "<|system|>", "<|user|>", "<|assistant|>"]

TINY_MODEL = dict(
    hidden_size=256,
    intermediate_size=512,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=4,
    head_dim=64,
    max_position_embeddings=1024,
    tie_word_embeddings=False,
)


# name -> (transformers architecture: its <Arch>Config and <Arch>ForCausalLM, their settings); the
# tokenizer sets vocabulary and special ids.
EMBEDDED_SHAPES: dict[str, tuple[str, dict]] = {
    "tiny": ("Llama", TINY_MODEL),
    # About 100M parameters, almost all in the decoder layers (the vocabulary has 600 tokens):
    # big enough to learn the whole synthetic world, small enough to train from scratch in minutes.
    "qwen2-100m": ("Qwen2", dict(
        hidden_size=768,
        intermediate_size=3072,
        num_hidden_layers=12,
        num_attention_heads=12,
        num_key_value_heads=2,
        max_position_embeddings=1024,
        tie_word_embeddings=False,
    )),
}


def cache_root() -> Path:
    return Path(os.environ.get("RAYALIGN_CACHE", Path.home() / ".cache" / "rayalign"))


def build_tokenizer(texts: list[str], vocab_size: int = 600, split_digits: bool = False):
    """Train a byte-level BPE tokenizer on ``texts`` and wrap it for transformers.

    ``split_digits`` keeps every digit its own token (as Llama and Qwen tokenizers do), so a tiny
    model can learn arithmetic digit by digit instead of memorising multi-digit tokens.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    if split_digits:
        tok.pre_tokenizer = pre_tokenizers.Sequence(
            [pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False)]
        )
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(texts, trainer=trainer)
    hf = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<|bos|>",
        eos_token="<|end|>",
        pad_token="<|pad|>",
        additional_special_tokens=["<|system|>", "<|user|>", "<|assistant|>"],
    )
    hf.chat_template = CHAT_TEMPLATE
    return hf


def task_corpus(task: str, seed: int) -> list[str]:
    """The text an embedded tokenizer learns: the synthetic world's, the arithmetic task's or the tool task's."""
    if task == "arithmetic":
        from rayalign.data.arithmetic import ArithmeticTask

        return ArithmeticTask(seed).corpus()
    if task == "tools":
        from rayalign.data.tools import ToolTask

        return ToolTask(seed).corpus()
    if task != "knowledge":
        raise ValueError(f"unknown embedded task {task!r} (known: {', '.join(EMBEDDED_TASKS)})")
    from rayalign.data.synthetic import SyntheticWorld

    return SyntheticWorld(seed).corpus()


EMBEDDED_TASKS = ("knowledge", "arithmetic", "tools")


def model_config(shape: str, tokenizer):
    """The transformers config of an embedded ``shape`` for ``tokenizer``'s vocabulary."""
    import transformers

    if shape not in EMBEDDED_SHAPES:
        raise ValueError(f"unknown embedded shape {shape!r} (known: {', '.join(EMBEDDED_SHAPES)})")
    arch, settings = EMBEDDED_SHAPES[shape]
    return getattr(transformers, f"{arch}Config")(
        vocab_size=len(tokenizer),
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        **settings,
    )


def build_embedded_model(dest: Path, seed: int = 0, texts: list[str] | None = None, task: str = "knowledge",
                         shape: str = "tiny") -> Path:
    """Write a random-initialised model of ``shape`` and its tokenizer to ``dest`` (atomically)."""
    import torch
    import transformers

    dest = Path(dest)
    tokenizer = build_tokenizer(texts if texts is not None else task_corpus(task, seed),
                                split_digits=task in ("arithmetic", "tools"))
    if shape != "tiny":
        # transformers picks a tokenizer class by model type; Qwen2's would add an unknown token of
        # its own (one id past the model's vocabulary) unless the files name one. Byte-level BPE
        # never produces it, so any existing token serves.
        tokenizer.unk_token = tokenizer.pad_token
    config = model_config(shape, tokenizer)
    torch.manual_seed(seed)
    model = getattr(transformers, f"{EMBEDDED_SHAPES[shape][0]}ForCausalLM")(config)
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.", dir=dest.parent))
    try:
        with _quiet_progress():  # a first run must not print save bars before a user's error line
            model.save_pretrained(tmp)
            tokenizer.save_pretrained(tmp)
        os.replace(tmp, dest)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return dest


@contextlib.contextmanager
def _quiet_progress():
    from transformers.utils import logging as hf_logging

    enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if enabled:
            hf_logging.enable_progress_bar()


def embedded_model_path(seed: int = 0, task: str = "knowledge", shape: str = "tiny") -> Path:
    """The cached embedded model of ``shape`` for ``seed`` (and ``task``'s tokenizer), built on first use."""
    # The knowledge model's key predates tasks; other tasks' keys cover their corpus, so a changed
    # generator never reuses a tokenizer trained on other text.
    extra = [task, hashlib.sha256("\n".join(task_corpus(task, seed)).encode()).hexdigest()] if task != "knowledge" else []
    if shape != "tiny":  # the tiny model's key predates shapes
        extra.append(EMBEDDED_SHAPES[shape])
    parts = [TINY_MODEL, CHAT_TEMPLATE, seed] + extra
    key = hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:12]
    path = cache_root() / f"{'tiny-llama' if shape == 'tiny' else shape}-{key}"
    if not (path / "config.json").exists():
        try:
            build_embedded_model(path, seed, task=task, shape=shape)
        except OSError:
            # Another process won the race to build the same model: use theirs.
            if not (path / "config.json").exists():
                raise
    return path
