"""User-facing errors: one line that names the config key, file, line or plugin at fault."""

from __future__ import annotations


class RayalignError(Exception):
    """An error caused by the user's input. The CLI prints it as one line and exits 2."""

    exit_code = 2


class ConfigError(RayalignError):
    def __init__(self, where: str, message: str):
        self.where = where
        super().__init__(f"config error: {where}: {message}")


class DataError(RayalignError):
    def __init__(self, where: str, message: str):
        self.where = where
        super().__init__(f"data error: {where}: {message}")


class PluginError(RayalignError):
    def __init__(self, plugin: str, message: str):
        self.plugin = plugin
        super().__init__(f"plugin error: {plugin}: {message}")


class WorkerError(RuntimeError):
    """A worker actor died, hung past its timeout or raised. Names the actor."""

    def __init__(self, actor_name: str, message: str):
        self.actor_name = actor_name
        super().__init__(f"worker {actor_name}: {message}")
