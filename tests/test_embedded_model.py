"""The embedded models: the tiny default and the larger shapes trained from scratch on a GPU
(``model: embedded:<task>/<shape>``), built locally with the task's tokenizer."""

import json

import pytest

from rayalign.config import RunConfig
from rayalign.errors import ConfigError
from rayalign.models import resolve_model


def test_a_larger_shape_is_a_qwen2_of_about_100m_parameters_with_the_tiny_models_tokenizer(tmp_path, monkeypatch):
    from safetensors import safe_open
    from transformers import AutoConfig, AutoTokenizer

    monkeypatch.setenv("RAYALIGN_CACHE", str(tmp_path))
    big = resolve_model(RunConfig.model_validate({"model": "embedded:knowledge/qwen2-100m", "seed": 3}))
    tiny = resolve_model(RunConfig.model_validate({"model": "embedded:knowledge", "seed": 3}))
    config = AutoConfig.from_pretrained(big)
    assert config.model_type == "qwen2" and AutoConfig.from_pretrained(tiny).model_type == "llama"
    with safe_open(f"{big}/model.safetensors", "pt") as f:
        params = sum(_numel(f.get_slice(name).get_shape()) for name in f.keys())
    assert 95e6 < params < 110e6, params
    assert AutoTokenizer.from_pretrained(big).get_vocab() == AutoTokenizer.from_pretrained(tiny).get_vocab()
    assert config.vocab_size == len(AutoTokenizer.from_pretrained(big))
    # Built once: a second resolve reuses the cached directory.
    assert resolve_model(RunConfig.model_validate({"model": "embedded:knowledge/qwen2-100m", "seed": 3})) == big
    assert json.loads((tmp_path / big.rsplit("/", 1)[1] / "config.json").read_text())["num_hidden_layers"] == 12


def _numel(shape) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


def test_an_unknown_shape_names_the_key_and_the_known_shapes():
    with pytest.raises(ConfigError) as err:
        resolve_model(RunConfig.model_validate({"model": "embedded:knowledge/llama-7b"}))
    message = str(err.value)
    assert message.startswith("config error: model:") and "'embedded:knowledge/llama-7b'" in message
    assert "embedded:knowledge/qwen2-100m" in message and "embedded:knowledge/tiny" in message
