"""The hook reference must cover every hook, with the signature the code has today."""

import ast
import re

from rayalign import hookspecs

from conftest import REPO

DOC = (REPO / "docs" / "hooks.md").read_text()


def hook_signatures() -> dict[str, str]:
    tree = ast.parse((REPO / "platform" / "rayalign" / "hookspecs.py").read_text())
    return {
        node.name: f"def {node.name}({ast.unparse(node.args)}) -> {ast.unparse(node.returns)}"
        for node in tree.body
        if isinstance(node, ast.FunctionDef) and getattr(hookspecs, node.name, None) is not None
        and hasattr(getattr(hookspecs, node.name), "rayalign_spec")
    }


def test_every_hook_is_documented_with_its_exact_signature():
    signatures = hook_signatures()
    assert signatures, "no hooks found"
    for name, signature in signatures.items():
        assert f"## `{name}`" in DOC, f"{name} has no section in docs/hooks.md"
        assert signature in DOC, f"docs/hooks.md shows another signature for {name}; the code says:\n{signature}"


def test_docs_describe_no_hook_that_does_not_exist():
    documented = set(re.findall(r"^## `(\w+)`", DOC, flags=re.M))
    assert documented == set(hook_signatures())


def test_hookspec_version_is_documented():
    assert f"version `{hookspecs.HOOKSPEC_VERSION}`" in DOC


def test_every_example_in_the_reference_registers_what_it_says():
    import types

    from rayalign.plugins import PluginManager

    blocks = [b for b in re.findall(r"```python\n(.*?)```", DOC, flags=re.S) if "@hookimpl" in b]
    assert len(blocks) == len(hook_signatures())
    modules = []
    for i, block in enumerate(blocks):
        module = types.ModuleType(f"doc_example_{i}")
        exec("from rayalign.hookspecs import hookimpl\n" + block, module.__dict__)
        modules.append(module)
    pm = PluginManager(extra_plugins=tuple(modules))
    assert "count" in pm.stages and "hinge" in pm.losses and "short_answer" in pm.rewards
    assert "question_rate" in pm.metrics and "alpaca" in pm.formats and "jsonl" in pm.trackers
    assert "explains" in pm.rewards and "median" in pm.advantage_estimators and "echo" in pm.environments
    loss, _ = pm.losses.get("hinge", where="doc")(beta=0.1)(*[__import__("torch").zeros(2)] * 4)
    assert loss.item() == 1.0
    alpaca = pm.formats.get("alpaca", where="doc").convert({"instruction": "Add", "input": "1+1", "output": "2"})
    assert alpaca["messages"][1] == {"role": "assistant", "content": "2"}
