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
    """A worker actor died, hung past its timeout or raised. Names the actor.

    ``retryable`` is true for a lost worker (killed, crashed, hung), which a restart from the last
    checkpoint can survive; an exception raised by the worker's own code would only repeat.
    """

    def __init__(self, actor_name: str, message: str, retryable: bool = False):
        self.actor_name, self.detail, self.retryable = actor_name, message, retryable
        super().__init__(f"worker {actor_name}: {message}")
