"""Discovers plugins through the ``rayalign`` entry-point group and collects what they register.

Built-in stages live in ``plugins/`` and are declared as entry points of the ``rayalign``
distribution, so they load exactly like a third-party package would.

Failure isolation: an installed plugin that fails to import, implements a hook that does not
exist (a typo such as ``register_stage``) or with a wrong signature, declares hookspec versions
this rayalign does not provide, or raises while registering, is set aside as *broken* with a
warning that names it and its package. A run that needs something only it could provide stops
before any work with that error; other runs go on. ``RAYALIGN_DISABLE_PLUGINS=name,name`` blocks
plugins by entry-point name. Plugins passed in code (``extra_plugins``) fail loudly instead.

A broken plugin contributes nothing: every ``register_*`` hook runs in one pass the first time any
registry is needed, and a plugin whose hook raises loses what its other hooks registered too, so a
half-registered plugin never serves a run. A name registered twice sets aside the plugin that is
not built in (or, between two third-party plugins, the later one); a built-in plugin is never the
one blamed, since its names are what the documentation and recipes promise.
"""

from __future__ import annotations

import contextlib
import importlib.metadata
import logging
import os
import types
from dataclasses import dataclass, field
from typing import Any, Callable, Generic, Iterator, TypeVar

import pluggy
from packaging.specifiers import InvalidSpecifier, SpecifierSet

from rayalign import hookspecs
from rayalign.errors import ConfigError, PluginError

ENTRY_POINT_GROUP = "rayalign"
DISABLE_ENV = "RAYALIGN_DISABLE_PLUGINS"
# A plugin module may declare the hookspec versions it supports, e.g. RAYALIGN_HOOKSPEC = ">=1,<2".
VERSION_ATTRIBUTE = "RAYALIGN_HOOKSPEC"
BUILTIN_PACKAGE = "rayalign"  # the distribution whose entry points are the built-in plugins
# Kinds whose code runs only in the driver process: a plugin that provides only these need not be on the workers.
DRIVER_ONLY = ("tracker",)

log = logging.getLogger("rayalign")

T = TypeVar("T")


@dataclass
class PluginInfo:
    name: str
    package: str
    version: str
    hooks: list[str] = field(default_factory=list)
    error: str | None = None  # set when the plugin is broken and was not loaded
    installed: bool = True  # False for a plugin passed in code (extra_plugins)

    @property
    def broken(self) -> bool:
        return self.error is not None

    @property
    def builtin(self) -> bool:
        return self.package == BUILTIN_PACKAGE

    @property
    def third_party(self) -> bool:
        """Installed from a package other than rayalign: its failures are reported as its own."""
        return self.installed and not self.builtin


class Registry(Generic[T]):
    """Name -> item, remembering which plugin registered each one."""

    def __init__(self, kind: str, broken: Callable[[], list[PluginInfo]] = list,
                 on_get: Callable[[str, str], None] | None = None):
        self.kind = kind
        self._items: dict[str, T] = {}
        self.owner: dict[str, str] = {}
        self._broken = broken
        self._on_get = on_get  # told the owning plugin of every name looked up (PluginManager.recording_use)

    def add(self, name: str, item: T, plugin: str) -> None:
        if name in self._items:
            raise PluginError(
                plugin, f"{self.kind} {name!r} is already registered by plugin {self.owner[name]!r}"
            )
        self._items[name] = item
        self.owner[name] = plugin

    def get(self, name: str, where: str) -> T:
        try:
            item = self._items[name]
        except KeyError:
            known = ", ".join(sorted(self._items)) or "none"
            message = f"no plugin provides {self.kind} {name!r} (known: {known})"
            for info in self._broken():
                message += f"; plugin {info.name!r} (package {info.package}) is broken: {info.error}"
            raise ConfigError(where, message) from None
        if self._on_get is not None:
            self._on_get(self.kind, self.owner[name])
        return item

    def __contains__(self, name: str) -> bool:
        return name in self._items

    def __iter__(self) -> Iterator[str]:
        return iter(sorted(self._items))

    def items(self) -> list[tuple[str, T]]:
        return sorted(self._items.items())

    def drop_plugin(self, plugin: str) -> None:
        for name in [n for n, owner in self.owner.items() if owner == plugin]:
            del self._items[name], self.owner[name]


def _blocked() -> set[str]:
    return {n.strip() for n in os.environ.get(DISABLE_ENV, "").split(",") if n.strip()}


def check_hookspec_version(module: Any) -> None:
    """Raise ValueError when the plugin declares hookspec versions this rayalign does not provide."""
    wanted = getattr(module, VERSION_ATTRIBUTE, None)
    if wanted is None:
        return
    try:
        supported = SpecifierSet(wanted)
    except InvalidSpecifier:
        raise ValueError(f"{VERSION_ATTRIBUTE} = {wanted!r} is not a version specifier such as '>=1,<2'") from None
    if hookspecs.HOOKSPEC_VERSION not in supported:
        raise ValueError(
            f"supports hookspec versions {wanted} but this rayalign provides {hookspecs.HOOKSPEC_VERSION}"
        )


_REGISTRIES = {  # property -> (hook, kind)
    "stages": ("register_stages", "stage"),
    "losses": ("register_losses", "loss"),
    "rewards": ("register_rewards", "reward"),
    "metrics": ("register_metrics", "metric"),
    "formats": ("register_data_formats", "data format"),
    "detectors": ("register_detectors", "detector"),
    "filters": ("register_filters", "filter"),
    "trackers": ("register_trackers", "tracker"),
    "advantage_estimators": ("register_advantage_estimators", "advantage estimator"),
    "environments": ("register_environments", "environment"),
}


class PluginManager:
    """Loads plugins and exposes their registrations as typed registries."""

    def __init__(self, extra_plugins: tuple[Any, ...] = (), load_entry_points: bool = True):
        self._pm = pluggy.PluginManager(hookspecs.PROJECT)
        self._pm.add_hookspecs(hookspecs)
        self.info: dict[str, PluginInfo] = {}
        self._registries: dict[str, Registry] | None = None
        self._in_use: set[str] | None = None  # while recording_use: the plugins whose names were looked up
        if load_entry_points:
            self._load_entry_points()
        for plugin in extra_plugins:
            name = getattr(plugin, "__name__", repr(plugin))
            try:
                check_hookspec_version(plugin)
                self.register(plugin, name=name)
                self.info[name].installed = False
                self._check_hooks_exist(plugin)
            except (ValueError, pluggy.PluginValidationError) as exc:
                raise PluginError(name, str(exc)) from None

    @property
    def broken(self) -> list[PluginInfo]:
        return [i for i in self.info.values() if i.broken]

    def _load_entry_points(self) -> None:
        blocked = _blocked()
        for ep in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP):
            if ep.name in blocked or ep.name in self.info:
                continue
            package = ep.dist.name if ep.dist else "?"
            version = ep.dist.version if ep.dist else "?"
            try:
                module = ep.load()
            except Exception as exc:
                self._set_aside(ep.name, package, version, f"failed to import {ep.value!r}: {exc!r}")
                continue
            try:
                check_hookspec_version(module)
                self.register(module, name=ep.name, package=package, version=version)
                self._check_hooks_exist(module)
            except (ValueError, pluggy.PluginValidationError) as exc:
                if self._pm.is_registered(module):
                    self._pm.unregister(module)
                self._set_aside(ep.name, package, version, str(exc))

    def _check_hooks_exist(self, plugin: Any) -> None:
        """A hook implementation with no matching hook is a typo, not an extension point."""
        unknown = [c.name for c in self._pm.get_hookcallers(plugin) or [] if c.spec is None]
        if unknown:
            raise pluggy.PluginValidationError(
                plugin, f"unknown hook {', '.join(unknown)} (misspelt? hooks are: {', '.join(_hook_names())})"
            )

    def _set_aside(self, name: str, package: str, version: str, error: str) -> None:
        self.info[name] = PluginInfo(name, package, version, error=error)
        log.warning(
            "rayalign: plugin %r (package %s) is broken and was not loaded: %s. Runs that need it will stop; "
            "set %s=%s to silence this.", name, package, error, DISABLE_ENV, name,
        )

    def register(self, plugin: Any, name: str, package: str = "?", version: str = "?") -> None:
        self._pm.register(plugin, name=name)
        hooks = sorted(c.name for c in self._pm.get_hookcallers(plugin) or [])
        self.info[name] = PluginInfo(name, package, version, hooks)
        self._registries = None  # a new plugin invalidates what was collected so far

    def _collect_all(self) -> dict[str, Registry]:
        """Run every plugin's ``register_*`` hooks in one pass, so that a plugin set aside by one hook
        loses what its other hooks registered, whichever registry a caller asks for first."""
        registries = {attr: Registry(kind, broken=lambda: self.broken, on_get=self._used)
                      for attr, (_, kind) in _REGISTRIES.items()}
        for attr, (hook_name, _) in _REGISTRIES.items():
            registry = registries[attr]
            for impl in getattr(self._pm.hook, hook_name).get_hookimpls():
                plugin = impl.plugin_name
                info = self.info.get(plugin)
                if info is not None and info.broken:
                    continue

                def register(item: Any, *rest: Any, _plugin: str = plugin, _registry: Registry = registry) -> None:
                    # register(obj) for classes/objects with a .name; register(name, fn) for rewards.
                    name, value = (item, rest[0]) if rest else (item.name, item)
                    if name in _registry:
                        self._resolve_clash(registries, _registry, name, _plugin)
                    _registry.add(name, value, _plugin)

                try:
                    impl.function(register=register)
                except _SetAside:
                    continue
                except PluginError:
                    raise  # a clash involving a plugin passed in code: its author is running it now, so fail loudly
                except Exception as exc:
                    if info is None or not info.installed:
                        raise PluginError(plugin, f"hook {hook_name} raised {exc!r}") from exc
                    self._set_aside_registered(registries, plugin, f"hook {hook_name} raised {exc!r}")
        return registries

    def _resolve_clash(self, registries: dict[str, Registry], registry: Registry, name: str, newcomer: str) -> None:
        """Two plugins registered one name: set aside the one that is not built in, else the later one."""
        holder = registry.owner[name]
        holder_info, new_info = self.info.get(holder), self.info.get(newcomer)
        holder_builtin = holder_info is not None and holder_info.builtin
        new_builtin = new_info is not None and new_info.builtin
        in_code = not (holder_info and holder_info.installed and new_info and new_info.installed)
        if in_code or (holder_builtin and new_builtin):  # a plugin passed in code, or our own bug: fail loudly
            registry.add(name, None, newcomer)  # raises, naming both plugins
        if new_builtin or holder_builtin:
            builtin = newcomer if new_builtin else holder
            reason = (f"{registry.kind} {name!r} is already registered by built-in plugin {builtin!r}; "
                      "a built-in name cannot be replaced, rename yours")
            if not holder_builtin:  # loaded before the built-in: set aside the one that was there
                self._set_aside_registered(registries, holder, reason)
                return
        else:
            holder_package = holder_info.package if holder_info else "?"
            reason = f"{registry.kind} {name!r} is already registered by plugin {holder!r} (package {holder_package})"
        self._set_aside_registered(registries, newcomer, reason)
        raise _SetAside

    def _set_aside_registered(self, registries: dict[str, Registry], plugin: str, reason: str) -> None:
        for registry in registries.values():
            registry.drop_plugin(plugin)
        info = self.info.get(plugin) or PluginInfo(plugin, "?", "?")
        self._set_aside(plugin, info.package, info.version, reason)
        self.info[plugin].hooks = info.hooks  # still listed, so `rayalign plugins` shows what it tried

    def _used(self, kind: str, plugin: str) -> None:
        if self._in_use is not None and kind not in DRIVER_ONLY:
            self._in_use.add(plugin)

    @contextlib.contextmanager
    def recording_use(self) -> Iterator[set[str]]:
        """The plugins whose stages, losses, rewards, ... are looked up by name inside the block:
        those a run uses, which every node of the cluster must be able to import."""
        self._in_use = used = set()
        try:
            yield used
        finally:
            self._in_use = None

    def module_of(self, plugin: str) -> str | None:
        """The name of the module a plugin's entry point loaded (None for a plugin passed in code)."""
        info = self.info.get(plugin)
        obj = self._pm.get_plugin(plugin)
        if info is None or not info.installed or obj is None:
            return None
        return obj.__name__ if isinstance(obj, types.ModuleType) else getattr(obj, "__module__", None)

    def _registry(self, attr: str) -> Registry:
        if self._registries is None:
            self._registries = self._collect_all()
        return self._registries[attr]

    @property
    def stages(self) -> Registry:
        return self._registry("stages")

    @property
    def losses(self) -> Registry:
        return self._registry("losses")

    @property
    def rewards(self) -> Registry:
        return self._registry("rewards")

    @property
    def metrics(self) -> Registry:
        return self._registry("metrics")

    @property
    def formats(self) -> Registry:
        return self._registry("formats")

    @property
    def detectors(self) -> Registry:
        return self._registry("detectors")

    @property
    def filters(self) -> Registry:
        return self._registry("filters")

    @property
    def trackers(self) -> Registry:
        return self._registry("trackers")

    @property
    def advantage_estimators(self) -> Registry:
        return self._registry("advantage_estimators")

    @property
    def environments(self) -> Registry:
        return self._registry("environments")


class _SetAside(Exception):
    """Stops a plugin's hook once the plugin has been set aside mid-registration."""


def _hook_names() -> list[str]:
    return sorted(n for n in dir(hookspecs) if n.startswith("register_"))


_default: PluginManager | None = None


def get_plugin_manager() -> PluginManager:
    """The process-wide plugin manager, loaded on first use."""
    global _default
    if _default is None:
        _default = PluginManager()
    return _default
