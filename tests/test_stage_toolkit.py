"""The example stage in docs/writing-plugins.md ("The stage toolkit") registers, declares what it returns,
and returns it: run on CPU with the rollout workers replaced by a stand-in."""

from __future__ import annotations

import logging
import re
import types

from rayalign.config import RunConfig
from rayalign.data.datasets import load_records
from rayalign.plugins import PluginManager
from rayalign.rollout.vllm_engine import Completion
from rayalign.stage import Artifacts, Produces, StageContext

from conftest import REPO

DOC = (REPO / "docs" / "writing-plugins.md").read_text()


def example_module() -> types.ModuleType:
    section = DOC.split("## The stage toolkit", 1)[1].split("\n## ", 1)[0]
    blocks = [b for b in re.findall(r"```python\n(.*?)```", section, flags=re.S) if "@hookimpl" in b]
    assert len(blocks) == 1, "the stage toolkit section should hold one complete example stage"
    module = types.ModuleType("doc_stage_toolkit_example")
    exec(blocks[0], module.__dict__)
    return module


def fake_sample_completions(ctx, model, prompts, sampling, label="rollout"):
    """What the rollout workers return: ``sampling.n`` completions per prompt, in order."""
    return [[Completion(i, [1, 2], f" answer {k} to prompt {i} ", None, "stop") for k in range(sampling.n)]
            for i in range(len(prompts))]


def test_the_example_stage_registers_declares_and_returns_its_dataset(tmp_path, tiny_model_path):
    module = example_module()
    plugins = PluginManager(extra_plugins=(module,))
    stage_cls = plugins.stages.get("self_answers", where="doc")
    stage = stage_cls(stage_cls.Config(n=2, output="answers"))
    run = RunConfig.model_validate({"output_dir": str(tmp_path / "run"), "stages": [{"self_answers": {}}]})
    artifacts = Artifacts(model=tiny_model_path)
    stage.prepare(run, plugins, artifacts, 0)  # prompts: the data: key (synthetic prompts)
    assert stage.produces() == Produces(datasets=["answers"])

    module.sample_completions = fake_sample_completions  # no vLLM on this path
    stage.prompts = stage.prompts[:3]
    ctx = StageContext(run, plugins, None, 0, "self_answers", tmp_path, artifacts, logging.getLogger("rayalign"),
                       tmp_path / "checkpoints")
    result = stage.run(ctx)
    assert stage.produces().undeclared(result) == []
    assert set(result.datasets) == set(stage.produces().datasets)
    records, _ = load_records(str(tmp_path / result.datasets["answers"]), "chat", plugins.formats, 0)
    assert len(records) == 6 and result.metrics == {"prompts": 3, "answers": 6}
    assert records[0]["messages"][-1] == {"role": "assistant", "content": "answer 0 to prompt 0"}


def test_the_example_stage_checks_an_earlier_stages_dataset_in_prepare(tmp_path, tiny_model_path):
    import pytest

    from rayalign.errors import ConfigError

    plugins = PluginManager(extra_plugins=(example_module(),))
    stage_cls = plugins.stages.get("self_answers", where="doc")
    run = RunConfig.model_validate({"output_dir": str(tmp_path / "run"), "stages": [{"self_answers": {}}]})
    declared = Artifacts(model=tiny_model_path, will_produce=Produces(datasets=["questions"]))
    stage_cls(stage_cls.Config(prompts="questions")).prepare(run, plugins, declared, 1)
    with pytest.raises(ConfigError, match=r"stages\[1\]\.self_answers\.prompts: 'question' is no key under data:, "
                                          r"no file and no dataset an earlier stage produces"):
        stage_cls(stage_cls.Config(prompts="question")).prepare(run, plugins, declared, 1)
