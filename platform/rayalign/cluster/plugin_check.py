"""Before any work: every node of the Ray cluster can import the plugins the run uses.

A plugin installed only where the job was submitted imports on the driver, so the config checks
pass, and would otherwise be found missing only when an actor on another node fails to unpickle a
loss or a stage's object, deep in a traceback. One tiny task per alive node, pinned there with
``NodeAffinitySchedulingStrategy``, tries the imports under the job's runtime environment (what
``ray job submit --runtime-env-json`` ships reaches it too), and the first failure stops the run
with one line naming the node, the plugin and how to ship it.

Third-party plugins are imported in full (a missing dependency of theirs counts). The built-in
plugins ship inside rayalign itself, so for them finding the module is enough; importing them
would load torch and vLLM in every probe.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

from rayalign.errors import PluginError
from rayalign.plugins import ENTRY_POINT_GROUP

log = logging.getLogger("rayalign")


@dataclass(frozen=True)
class PluginModule:
    plugin: str  # entry-point name
    package: str  # distribution that provides it
    module: str  # what the entry point loads
    full_import: bool  # import it, rather than only find it


def modules_in_use(plugins: Any, used: set[str]) -> list[PluginModule]:
    """The modules of the installed plugins in ``used`` (plugins passed in code have none)."""
    out = []
    for name in sorted(used):
        module = plugins.module_of(name)
        if module is not None:
            info = plugins.info[name]
            out.append(PluginModule(name, info.package, module, full_import=not info.builtin))
    return out


def how_to_ship(item: PluginModule) -> str:
    if item.package == "rayalign":
        return "install rayalign on every node (the image: see deploy/)"
    top = item.module.split(".")[0]
    return (f"ship it with the job (ray job submit --runtime-env-json '{{\"py_modules\": [\"<path to {top}>\"]}}', "
            f"or '{{\"pip\": [\"{item.package}\"]}}') or install it in the image of every node")


def check_nodes_import(modules: list[PluginModule], timeout_s: float) -> None:
    """Raise PluginError, in one line, when some alive node cannot import one of ``modules``."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    if not modules:
        return
    # Defined here, so that cloudpickle ships the function by value: a node without rayalign can
    # still run it and report that rayalign itself is missing.
    def probe(wanted: list[tuple[str, str, bool]], group: str) -> list[tuple[str, str]]:
        """On one node: (module, error) for each plugin module that does not import there. A plugin
        imports the way the driver loads it, through its installed entry point (never a module
        named by data); where the node has the module but not its distribution's metadata (shipped
        as ``py_modules``), finding the module is what unpickling needs."""
        import importlib.metadata
        import importlib.util

        entry_points = {ep.name: ep for ep in importlib.metadata.entry_points(group=group)}
        failed = []
        for plugin, module, full in wanted:
            try:
                if full and plugin in entry_points:
                    entry_points[plugin].load()
                elif importlib.util.find_spec(module) is None:
                    raise ModuleNotFoundError(f"No module named {module!r}")
            except Exception as exc:  # any failure to import is the finding, whatever its kind
                failed.append((module, f"{type(exc).__name__}: {exc}".splitlines()[0]))
        return failed

    remote_probe = ray.remote(num_cpus=0, max_retries=0)(probe)
    nodes = [n for n in ray.nodes() if n.get("Alive")]
    wanted = [(m.plugin, m.module, m.full_import) for m in modules]
    refs = [remote_probe.options(scheduling_strategy=NodeAffinitySchedulingStrategy(n["NodeID"], soft=False),
                                 name="rayalign-plugin-import-check").remote(wanted, ENTRY_POINT_GROUP) for n in nodes]
    by_module = {m.module: m for m in modules}
    for node, ref in zip(nodes, refs):
        where = f"node {node.get('NodeManagerAddress', '?')} ({node['NodeID'][:8]})"
        try:
            failed = ray.get(ref, timeout=timeout_s)
        except ray.exceptions.GetTimeoutError:
            raise PluginError(modules[0].plugin, f"{where} did not answer the plugin import check within "
                              f"{timeout_s:.0f}s (timeouts.worker_start_s)") from None
        except ray.exceptions.RayError as exc:  # the task could not even start there
            detail = str(exc).strip().splitlines()[-1] if str(exc).strip() else type(exc).__name__
            raise PluginError(modules[0].plugin, f"{where} could not run the plugin import check: {detail}") from None
        if failed:
            module, error = failed[0]
            item = by_module[module]
            more = f" (and {len(failed) - 1} more)" if len(failed) > 1 else ""
            raise PluginError(f"{item.plugin} ({item.package})", f"{where} cannot import {module}: {error}{more}; "
                              f"every node needs the plugins a run uses: {how_to_ship(item)}")
    log.info("plugins the run uses import on all %d node(s): %s", len(nodes),
             ", ".join(f"{m.plugin} ({m.module})" for m in modules))
