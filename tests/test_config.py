"""Config loading, overrides and validation errors that name the key."""

from pathlib import Path

import pytest

from rayalign.config import load_config, validate_stages
from rayalign.errors import ConfigError
from rayalign.plugins import get_plugin_manager

from conftest import REPO

CONFIGS = sorted((REPO / "recipes" / "configs").glob("*.yaml"))


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "cfg.yaml"
    path.write_text(text)
    return path


BASE = """
stages:
  - sft: {epochs: 1}
  - generate: {}
  - dpo: {beta: 0.1}
"""


@pytest.mark.parametrize("path", CONFIGS, ids=[p.name for p in CONFIGS])
def test_every_shipped_config_validates(path):
    cfg = load_config(path)
    entries = validate_stages(cfg, get_plugin_manager().stages, str(path))
    assert [e.name for e in entries] == [next(iter(s)) for s in cfg.stages]


def test_overrides_set_nested_keys_and_stage_options(tmp_path):
    cfg = load_config(write(tmp_path, BASE), ["model=/models/x", "data.sft=/d/sft.jsonl", "dpo.beta=0.25",
                                              "stages.0.sft.lr=1e-4", "resources.trainer.num_workers=4"])
    assert cfg.model == "/models/x" and cfg.data.sft == "/d/sft.jsonl"
    assert cfg.stages[2]["dpo"]["beta"] == 0.25 and cfg.stages[0]["sft"]["lr"] == 1e-4
    assert cfg.resources.trainer.num_workers == 4
    entries = validate_stages(cfg, get_plugin_manager().stages)
    assert entries[2].config.beta == 0.25


def test_output_dir_time_placeholder(tmp_path):
    cfg = load_config(write(tmp_path, BASE + "output_dir: runs/x/{time}\n"))
    assert "{time}" not in cfg.output_dir and cfg.output_dir.startswith("runs/x/2")


@pytest.mark.parametrize(
    "override, message",
    [
        ("dpo.beta=abc", r"stages\[2\]\.dpo\.beta: expected float, got 'abc'"),
        ("sft.epochs=2.5", r"stages\[0\]\.sft\.epochs: expected int"),
        ("sft.learning_rate=1", r"stages\[0\]\.sft\.learning_rate: unknown key"),
        ("resources.trainer.gpus=1", r"resources\.trainer\.gpus: unknown key"),
        ("modle=/x", r"modle: unknown key"),
        ("data.eval_fraction=2", r"data\.eval_fraction: Input should be less than 1"),
    ],
)
def test_bad_keys_and_types_are_reported_with_their_path(tmp_path, override, message):
    with pytest.raises(ConfigError, match=message):
        cfg = load_config(write(tmp_path, BASE), [override])
        validate_stages(cfg, get_plugin_manager().stages)


def test_unknown_stage_is_reported_with_its_index(tmp_path):
    cfg = load_config(write(tmp_path, "stages:\n  - sft: {}\n  - ppo_typo: {}\n"))
    with pytest.raises(ConfigError, match=r"stages\[1\]: no plugin provides stage 'ppo_typo'"):
        validate_stages(cfg, get_plugin_manager().stages)


def test_yaml_syntax_error_names_file_and_line(tmp_path):
    path = write(tmp_path, "stages:\n  - sft: {epochs: 1\n  - dpo: {}\n")
    with pytest.raises(ConfigError, match=r"cfg\.yaml:\d+: invalid YAML"):
        load_config(path)


def test_override_without_equals_is_explained(tmp_path):
    with pytest.raises(ConfigError, match="key=value"):
        load_config(write(tmp_path, BASE), ["dpo.beta"])
