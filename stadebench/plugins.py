"""Plugin manager: built-ins and installed plugins, and the registries they fill.

Built-in metrics and patterns are registered through the same hooks as third-party
plugins. Installed plugins are found through the ``stadebench`` entry-point group and
loaded one by one, so a broken plugin is reported (``stadebench plugins``) and skipped.

Environment variables:

- ``STADEBENCH_LOAD_PLUGINS``: comma-separated entry-point names to load; when set,
  no other installed plugin loads (set it empty to load none).
- ``STADEBENCH_BLOCK_PLUGINS``: comma-separated entry-point names never to load.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import os
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import pluggy

from . import hookspecs
from .errors import ConfigError, PluginError, UnknownNameError
from .kinds import KINDS

if TYPE_CHECKING:
    from .base import Allocator, Metric, Pattern

__all__ = [
    "DEFAULT_PLUGINS", "ENTRY_POINT_GROUP", "KINDS", "PluginInfo", "Plugins", "Registration", "Registry",
    "get_plugins", "reset_plugins", "resolve", "resolve_allocator", "resolve_metric", "resolve_pattern",
    "resolve_plugin",
]

ENTRY_POINT_GROUP = "stadebench"

DEFAULT_PLUGINS = (
    "stadebench.core.metrics.basic",
    "stadebench.core.metrics.stade",
    "stadebench.core.metrics.sparsegpt",
    "stadebench.core.metrics.gradient",
    "stadebench.core.refiners",
    "stadebench.core.reconstructors",
    "stadebench.core.patterns",
    "stadebench.core.allocation",
    "stadebench.data.datasets",
    "stadebench.evaluation.perplexity",
    "stadebench.evaluation.fidelity",
    "stadebench.evaluation.speed",
    "stadebench.evaluation.diagnostics",
    "stadebench.evaluation.lmeval",
)


@dataclass(frozen=True)
class Registration:
    """One registered item: its class and who registered it."""

    kind: str
    name: str
    cls: type
    plugin: str
    version: str


@dataclass
class PluginInfo:
    """What ``stadebench plugins`` shows for one plugin."""

    name: str
    distribution: str | None = None
    version: str | None = None
    hooks: list[str] = field(default_factory=list)
    registered: list[str] = field(default_factory=list)
    error: str | None = None
    """Why it failed to load, or what it registered wrongly; None when all is well."""
    load_error: str | None = None


class Registry:
    """Names of one kind (metric, pattern, …) mapped to the classes plugins registered."""

    def __init__(self, kind: str, base: type, plural: str | None = None):
        self.kind, self.base, self.plural = kind, base, plural or f"{kind}s"
        self.items: dict[str, Registration] = {}
        self.problems: list[tuple[str, str]] = []

    def add(self, cls: Any, plugin: str) -> None:
        name = getattr(cls, "name", None)
        if not (isinstance(cls, type) and issubclass(cls, self.base)):
            self.problems.append((plugin, f"registered {cls!r}, which is not a {self.base.__name__} subclass"))
            return
        if not isinstance(name, str) or not name:
            self.problems.append((plugin, f"{self.kind} class {cls.__name__} has no name"))
            return
        if name in self.items:
            first = self.items[name].plugin
            self.problems.append(
                (plugin, f"{self.kind} {name!r} is already registered by {first}; the duplicate was skipped")
            )
            return
        self.items[name] = Registration(self.kind, name, cls, plugin, str(getattr(cls, "version", "0")))

    def __contains__(self, name: str) -> bool:
        return self._find(name) is not None

    def __iter__(self):
        return iter(self.items.values())

    def names(self) -> list[str]:
        return sorted(self.items)

    def _find(self, name: str) -> Registration | None:
        if name in self.items:
            return self.items[name]
        for reg in self.items.values():  # parametric names such as "2:4"
            matches = getattr(reg.cls, "matches", None)
            if matches is not None and matches(name):
                return reg
        return None

    def get(self, name: str) -> Registration:
        reg = self._find(name)
        if reg is None:
            hint = "Run `stadebench list " + self.plural + "` to see them; a plugin may need `pip install`."
            raise UnknownNameError(self.kind, name, self.items, hint)
        return reg


class Plugins:
    """The plugin manager plus the registries its hooks filled.

    ``registries[kind]`` is the registry of one kind of ``KINDS``; each is also an
    attribute named by the kind's plural (``plugins.metrics``, ``plugins.patterns``, …).
    """

    def __init__(self, load_entry_points: bool = True):
        self.pm = pluggy.PluginManager("stadebench")
        self.pm.add_hookspecs(hookspecs)
        self.info: dict[str, PluginInfo] = {}
        self._registries: dict[str, Registry] | None = None
        for modname in DEFAULT_PLUGINS:
            self.register(importlib.import_module(modname), name=modname)
        if load_entry_points:
            self._load_entry_points()

    def register(self, plugin: Any, name: str | None = None, distribution: str | None = None,
                 version: str | None = None) -> str:
        """Register a plugin module or object (as an installed plugin would be)."""
        name = self.pm.register(plugin, name=name)
        if name is None:
            raise PluginError(f"plugin {plugin!r} is already registered")
        hooks = [h.name for h in self.pm.get_hookcallers(plugin) or []]
        self.info[name] = PluginInfo(name, distribution, version, sorted(hooks))
        self._registries = None
        return name

    def unregister(self, name: str) -> None:
        self.pm.unregister(name=name)
        self.info.pop(name, None)
        self._registries = None

    def _load_entry_points(self) -> None:
        allow = os.environ.get("STADEBENCH_LOAD_PLUGINS")
        allowed = None if allow is None else {s.strip() for s in allow.split(",") if s.strip()}
        blocked = {s.strip() for s in os.environ.get("STADEBENCH_BLOCK_PLUGINS", "").split(",") if s.strip()}
        seen: set[str] = set()
        for ep in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP):
            if (allowed is not None and ep.name not in allowed) or ep.name in blocked:
                continue
            dist = ep.dist.name if ep.dist else None
            version = ep.dist.version if ep.dist else None
            if ep.name in seen or ep.name in self.info:
                self.info[f"{ep.name} ({dist})"] = PluginInfo(
                    ep.name, dist, version, load_error=f"entry point name {ep.name!r} is used twice; skipped")
                continue
            seen.add(ep.name)
            try:
                module = ep.load()
                self.register(module, name=ep.name, distribution=dist, version=version)
            except (Exception, SystemExit) as exc:  # a broken plugin is reported, never fatal
                self.info[ep.name] = PluginInfo(ep.name, dist, version, load_error=f"{type(exc).__name__}: {exc}")

    @property
    def registries(self) -> dict[str, Registry]:
        if self._registries is None:
            self._registries = self._collect()
        return self._registries

    def _collect(self) -> dict[str, Registry]:
        regs = {name: Registry(name, kind.base_class(), kind.plural) for name, kind in KINDS.items()}
        for info in self.info.values():
            info.registered, info.error = [], info.load_error
        for name, kind in KINDS.items():
            hook = getattr(self.pm.hook, kind.hook, None)
            if hook is None:
                raise PluginError(f"the {name} kind has no `{kind.hook}` hookspec (see stadebench.hookspecs)")
            # Call each implementation separately so items are attributed to their plugin.
            for impl in hook.get_hookimpls():  # registration order: the first name wins
                def register(cls, _plugin=impl.plugin_name, _kind=name):
                    regs[_kind].add(cls, _plugin)
                    if _plugin in self.info and getattr(cls, "name", None):
                        self.info[_plugin].registered.append(f"{_kind} {cls.name}")
                try:
                    impl.function(register=register)
                except (Exception, SystemExit) as exc:
                    regs[name].problems.append((impl.plugin_name, f"{kind.hook} failed: {exc!r}"))
        for reg in regs.values():
            for plugin, message in reg.problems:
                if plugin in self.info:
                    self.info[plugin].error = "; ".join(filter(None, [self.info[plugin].error, message]))
        return regs

    def provenance(self, plugin: str) -> tuple[str, str | None]:
        """``(distribution, version)`` of a registered plugin; built-ins are stadebench's."""
        info = self.info.get(plugin)
        if info and info.distribution:
            return info.distribution, info.version
        if plugin.startswith("stadebench."):
            from .version import __version__

            return "stadebench", __version__
        return plugin, info.version if info else None

    def problems(self) -> list[tuple[str, str]]:
        """``(plugin, message)`` for every plugin that failed to load or register."""
        self.registries  # noqa: B018 - registration problems are found while collecting
        return [(i.name, i.error) for i in self.info.values() if i.error]

    def __getattr__(self, name: str) -> Registry:
        # plugins.metrics, plugins.patterns, …: one registry per kind, named by its plural
        for kind in KINDS.values():
            if kind.plural == name:
                return self.registries[kind.name]
        raise AttributeError(f"{type(self).__name__!r} object has no attribute {name!r}")


_plugins: Plugins | None = None


def get_plugins() -> Plugins:
    """The process-wide plugin manager, created on first use."""
    global _plugins
    if _plugins is None:
        _plugins = Plugins()
    return _plugins


def reset_plugins() -> None:
    """Forget the plugin manager (the next ``get_plugins()`` loads everything again)."""
    global _plugins
    _plugins = None


# --- names to instances ------------------------------------------------------------
# The pruning core takes instances; the API (stadebench.prune) and the suites look names
# up here.


def resolve_plugin(kind: str, item: Any, options: dict[str, Any] | None = None) -> Any:
    """The registered item of ``kind`` (``"metric"``, …) that the name or spec ``item``
    names, built with ``options``; an instance is returned as it is (it carries its own
    options: passing others is an error)."""
    entry = KINDS[kind]
    if isinstance(item, str):
        return entry.build(get_plugins().registries[kind].get(item).cls, item, options)
    if options:
        raise ConfigError(entry.instance_options_error)
    return item


def resolve_metric(metric: str | Metric, options: dict[str, Any] | None = None) -> Metric:
    """``resolve_plugin("metric", metric, options)``."""
    return resolve_plugin("metric", metric, options)


def resolve_pattern(pattern: str | Pattern, options: dict[str, Any] | None = None) -> Pattern:
    """``resolve_plugin("pattern", pattern, options)``."""
    return resolve_plugin("pattern", pattern, options)


def resolve_allocator(allocator: str | Allocator, options: dict[str, Any] | None = None) -> Allocator:
    """``resolve_plugin("allocator", allocator, options)``."""
    return resolve_plugin("allocator", allocator, options)


def resolve(metric: str | Metric, pattern: str | Pattern, metric_options: dict[str, Any] | None = None,
            pattern_options: dict[str, Any] | None = None) -> tuple[Metric, Pattern]:
    """A metric and a pattern from registered names (instances pass through), as the
    engine takes them."""
    return resolve_plugin("metric", metric, metric_options), resolve_plugin("pattern", pattern, pattern_options)
