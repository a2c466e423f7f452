"""Discovers plugins through the ``rayalign`` entry-point group and collects what they register.

Built-in stages live in ``plugins/`` and are declared as entry points of the ``rayalign``
distribution, so they load exactly like a third-party package would. A plugin can be blocked
with ``RAYALIGN_DISABLE_PLUGINS=name,name``. A hook implementation whose name matches no hook
(a typo such as ``register_stage``) fails at start-up, naming the plugin.
"""

from __future__ import annotations

import importlib.metadata
import os
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any, Callable, Generic, Iterator, TypeVar

import pluggy

from rayalign import hookspecs
from rayalign.errors import ConfigError, PluginError

ENTRY_POINT_GROUP = "rayalign"
DISABLE_ENV = "RAYALIGN_DISABLE_PLUGINS"

T = TypeVar("T")


@dataclass
class PluginInfo:
    name: str
    package: str
    version: str
    hooks: list[str] = field(default_factory=list)


class Registry(Generic[T]):
    """Name -> item, remembering which plugin registered each one."""

    def __init__(self, kind: str):
        self.kind = kind
        self._items: dict[str, T] = {}
        self.owner: dict[str, str] = {}

    def add(self, name: str, item: T, plugin: str) -> None:
        if name in self._items:
            raise PluginError(
                plugin, f"{self.kind} {name!r} is already registered by plugin {self.owner[name]!r}"
            )
        self._items[name] = item
        self.owner[name] = plugin

    def get(self, name: str, where: str) -> T:
        try:
            return self._items[name]
        except KeyError:
            known = ", ".join(sorted(self._items)) or "none"
            raise ConfigError(where, f"no plugin provides {self.kind} {name!r} (known: {known})") from None

    def __contains__(self, name: str) -> bool:
        return name in self._items

    def __iter__(self) -> Iterator[str]:
        return iter(sorted(self._items))

    def items(self) -> list[tuple[str, T]]:
        return sorted(self._items.items())


def _blocked() -> set[str]:
    return {n.strip() for n in os.environ.get(DISABLE_ENV, "").split(",") if n.strip()}


class PluginManager:
    """Loads plugins and exposes their registrations as typed registries."""

    def __init__(self, extra_plugins: tuple[Any, ...] = (), load_entry_points: bool = True):
        self._pm = pluggy.PluginManager(hookspecs.PROJECT)
        self._pm.add_hookspecs(hookspecs)
        self.info: dict[str, PluginInfo] = {}
        if load_entry_points:
            self._load_entry_points()
        for plugin in extra_plugins:
            self.register(plugin, name=getattr(plugin, "__name__", repr(plugin)))
        try:
            self._pm.check_pending()
        except pluggy.PluginValidationError as exc:
            name = self._pm.get_name(exc.plugin) or "?"
            package = self.info[name].package if name in self.info else "?"
            raise PluginError(name, f"{exc} (package {package}; misspelt hook name?)") from None

    def _load_entry_points(self) -> None:
        blocked = _blocked()
        for ep in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP):
            if ep.name in blocked or self._pm.get_plugin(ep.name) is not None:
                continue
            package = ep.dist.name if ep.dist else "?"
            version = ep.dist.version if ep.dist else "?"
            try:
                module = ep.load()
            except Exception as exc:  # a broken third-party plugin must not take the platform down
                raise PluginError(ep.name, f"failed to import {ep.value!r} from package {package}: {exc!r}") from exc
            self.register(module, name=ep.name, package=package, version=version)

    def register(self, plugin: Any, name: str, package: str = "?", version: str = "?") -> None:
        try:
            self._pm.register(plugin, name=name)
        except pluggy.PluginValidationError as exc:
            raise PluginError(name, f"{exc} (package {package})") from None
        hooks = sorted(c.name for c in self._pm.get_hookcallers(plugin) or [])
        self.info[name] = PluginInfo(name, package, version, hooks)
        # A new plugin invalidates what was collected so far.
        for attr in ("stages", "losses", "rewards", "metrics", "formats"):
            self.__dict__.pop(attr, None)

    def _collect(self, hook_name: str, kind: str, key: Callable[[Any], str]) -> Registry:
        registry: Registry = Registry(kind)
        for impl in getattr(self._pm.hook, hook_name).get_hookimpls():
            plugin = impl.plugin_name

            def register(item: Any, *rest: Any, _plugin: str = plugin) -> None:
                # register(obj) for classes/objects with a .name; register(name, fn) for rewards.
                if rest:
                    registry.add(item, rest[0], _plugin)
                else:
                    registry.add(key(item), item, _plugin)

            try:
                impl.function(register=register)
            except PluginError:
                raise
            except Exception as exc:
                raise PluginError(plugin, f"hook {hook_name} raised {exc!r}") from exc
        return registry

    @cached_property
    def stages(self) -> Registry:
        return self._collect("register_stages", "stage", lambda s: s.name)

    @cached_property
    def losses(self) -> Registry:
        return self._collect("register_losses", "loss", lambda s: s.name)

    @cached_property
    def rewards(self) -> Registry:
        return self._collect("register_rewards", "reward", lambda s: s.name)

    @cached_property
    def metrics(self) -> Registry:
        return self._collect("register_metrics", "metric", lambda s: s.name)

    @cached_property
    def formats(self) -> Registry:
        return self._collect("register_data_formats", "data format", lambda s: s.name)


_default: PluginManager | None = None


def get_plugin_manager() -> PluginManager:
    """The process-wide plugin manager, loaded on first use."""
    global _default
    if _default is None:
        _default = PluginManager()
    return _default

