"""Discovery and registration of stage plugins (pluggy, entry-point group ``groma``)."""

from __future__ import annotations

import importlib
import importlib.metadata as metadata
import os
import re
import traceback
import warnings
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import pluggy
from pydantic import BaseModel

from groma_core import hookspecs
from groma_core.errors import PluginConflictError, UnknownPluginError, did_you_mean
from groma_core.stages import STAGE_KINDS, BuildContext, Stage, check_stage

ENTRY_POINT_GROUP = "groma"
ENV_ALLOW = "GROMA_LOAD_PLUGINS"
ENV_DISABLE = "GROMA_DISABLE_PLUGIN_AUTOLOAD"

HOOK_FOR_KIND = {
    "image_tokenizer": "register_image_tokenizers",
    "region_proposer": "register_region_proposers",
    "region_encoder": "register_region_encoders",
    "language_backbone": "register_language_backbones",
}


class PluginWarning(UserWarning):
    """A plugin could not be loaded or registered; the others still work."""


@dataclass
class StageEntry:
    """One registered stage implementation."""

    kind: str
    name: str
    factory: Callable[[BaseModel, BuildContext], Stage]
    config: type[BaseModel]
    description: str
    plugin: str
    distribution: str
    version: str

    def build(self, config: BaseModel, context: BuildContext) -> Stage:
        """Call the factory and check that it returned the right kind of stage."""
        return check_stage(self.kind, self.factory(config, context), self.name)


@dataclass
class PluginRecord:
    """What ``groma plugins`` shows for one plugin: where it comes from and whether it loaded."""

    name: str
    distribution: str
    version: str
    status: str = "ok"
    error: str | None = None
    stages: list[tuple[str, str]] = field(default_factory=list)
    cause: str | None = None
    """the exception that made it fail, without where it was raised (what an unknown-plugin error repeats)"""


class PluginManager:
    """An explicit registry of stage plugins.

    ``PluginManager()`` registers groma-core's built-in stages and, unless autoloading is off, every entry point
    of the group ``groma``. A plugin that fails to import or to register becomes a :class:`PluginWarning` and an
    error line in :attr:`records`; the rest keep working. ``GROMA_LOAD_PLUGINS=a,b`` loads only the named entry
    points (or distributions); ``GROMA_DISABLE_PLUGIN_AUTOLOAD=1`` loads none.
    """

    def __init__(self, autoload: bool = True, env: Mapping[str, str] | None = None):
        self._pm = pluggy.PluginManager(ENTRY_POINT_GROUP)
        self._pm.add_hookspecs(hookspecs)
        self._stages: dict[str, dict[str, StageEntry]] = {kind: {} for kind in STAGE_KINDS}
        self._conflicts: dict[tuple[str, str], list[StageEntry]] = {}
        self.records: list[PluginRecord] = []
        from groma_core import builtin

        self.register_plugin(builtin, name="builtin", distribution="groma-core")
        if autoload:
            self.load_entry_points(env=os.environ if env is None else env)

    # -- loading ---------------------------------------------------------------------------------------------
    def load_entry_points(self, env: Mapping[str, str] | None = None) -> None:
        """Load every installed entry point of the group ``groma``, defensively, honouring the environment."""
        env = os.environ if env is None else env
        if env.get(ENV_DISABLE, "").strip().lower() in {"1", "true", "yes"}:
            return
        allow_raw = env.get(ENV_ALLOW)
        allow = {a.strip() for a in allow_raw.split(",") if a.strip()} if allow_raw is not None else None
        seen: set[tuple[str, str]] = set()
        for ep in metadata.entry_points(group=ENTRY_POINT_GROUP):
            dist = getattr(ep, "dist", None)
            dist_name = dist.name if dist is not None else "unknown"
            version = dist.version if dist is not None else "?"
            if (ep.name, dist_name) in seen:  # the same distribution found twice on sys.path
                continue
            seen.add((ep.name, dist_name))
            if allow is not None and ep.name not in allow and dist_name not in allow:
                continue
            try:
                plugin = ep.load()
            except BaseException as exc:  # noqa: BLE001 - a broken plugin must never take the program down
                if isinstance(exc, KeyboardInterrupt):
                    raise
                self._fail(PluginRecord(ep.name, dist_name, version), f"import failed: {_describe(exc)}", _cause(exc))
                continue
            self.register_plugin(plugin, name=ep.name, distribution=dist_name, version=version)

    def register_plugin(
        self, plugin: Any, name: str | None = None, distribution: str | None = None, version: str | None = None
    ) -> PluginRecord:
        """Register a plugin object (module or instance with hook implementations) and collect its stages."""
        name = name or getattr(plugin, "__name__", type(plugin).__name__)
        distribution = distribution or name
        if version is None:
            try:
                version = metadata.version(distribution)
            except metadata.PackageNotFoundError:
                version = "-"
        record = PluginRecord(name, distribution, version)
        try:
            self._pm.register(plugin, name=name)
            self._pm.check_pending()
        except Exception as exc:  # noqa: BLE001
            try:
                self._pm.unregister(plugin)
            except Exception:  # noqa: BLE001 - it may not have been registered at all
                pass
            return self._fail(record, f"invalid plugin: {_describe(exc)}", _cause(exc))
        for kind, hook_name in HOOK_FOR_KIND.items():
            caller = getattr(self._pm.hook, hook_name)
            for impl in caller.get_hookimpls():
                if impl.plugin is not plugin:
                    continue
                try:
                    impl.function(register=self._registrar(kind, record))
                except Exception as exc:  # noqa: BLE001
                    return self._fail(record, f"{hook_name} raised {_describe(exc)}", _cause(exc))
        self.records.append(record)
        return record

    def _fail(self, record: PluginRecord, message: str, cause: str) -> PluginRecord:
        record.status = "error"
        record.error = message
        record.cause = cause
        self.records.append(record)
        warnings.warn(f"groma plugin {record.name!r} ({record.distribution}): {message}", PluginWarning, stacklevel=3)
        return record

    def _registrar(self, kind: str, record: PluginRecord) -> Callable[..., None]:
        def register(
            name: str,
            factory: Callable[[BaseModel, BuildContext], Stage],
            config: type[BaseModel] | None = None,
            description: str = "",
        ) -> None:
            if not isinstance(name, str) or not name:
                raise TypeError(f"register(name=...) needs a non-empty string, got {name!r}")
            if not callable(factory):
                raise TypeError(f"register({name!r}, factory=...) needs a callable, got {factory!r}")
            if config is None:
                from groma_core.config import StageOptions

                config = StageOptions
            if not (isinstance(config, type) and issubclass(config, BaseModel)):
                raise TypeError(f"register({name!r}, config=...) needs a pydantic model class, got {config!r}")
            entry = StageEntry(
                kind, name, factory, config, description, record.name, record.distribution, record.version
            )
            existing = self._stages[kind].get(name)
            if existing is not None or (kind, name) in self._conflicts:
                clash = self._conflicts.setdefault((kind, name), [existing] if existing else [])
                clash.append(entry)
                self._stages[kind].pop(name, None)
                owners = _owners(clash)
                msg = f"{kind} name {name!r} is registered by both {owners}"
                warnings.warn(f"groma: {msg}; neither is used", PluginWarning, stacklevel=3)
                record.stages.append((kind, name))
                record.status = "conflict"
                record.error = msg
                for other in self.records:
                    if other.distribution in {e.distribution for e in clash} and other.status == "ok":
                        other.status = "conflict"
                        other.error = msg
                return
            self._stages[kind][name] = entry
            record.stages.append((kind, name))

        return register

    # -- lookup ----------------------------------------------------------------------------------------------
    def names(self, kind: str) -> list[str]:
        """Installed names of a stage kind, sorted."""
        return sorted(self._stages[kind])

    def entries(self) -> list[StageEntry]:
        """Every registered stage, grouped by kind."""
        return [e for kind in STAGE_KINDS for e in sorted(self._stages[kind].values(), key=lambda e: e.name)]

    def get(self, kind: str, name: str) -> StageEntry:
        """The registered stage ``name`` of ``kind``; raises with the installed names when there is none."""
        if kind not in STAGE_KINDS:
            raise ValueError(f"unknown stage kind {kind!r}; expected one of {list(STAGE_KINDS)}")
        if (kind, name) in self._conflicts:
            owners = _owners(self._conflicts[(kind, name)])
            raise PluginConflictError(
                f"{kind} name {name!r} is registered by both {owners}; uninstall one of them or restrict "
                f"loading with {ENV_ALLOW}"
            )
        entry = self._stages.get(kind, {}).get(name)
        if entry is not None:
            return entry
        failed = self.failed_for(name)
        if failed:
            causes = "; ".join(f"{r.distribution} failed to load ({r.cause})" for r in failed)
            raise UnknownPluginError(f"{kind} plugin {name!r} is not available: {causes}")
        installed = self.names(kind)
        others = [r.name for r in self.records if r.status == "error"]
        broken = ""
        if others:
            broken = f"; {len(others)} plugin(s) failed to load: {', '.join(others)} (see `groma plugins`)"
        raise UnknownPluginError(
            f"unknown {kind} plugin {name!r}{did_you_mean(name, installed)}; installed: "
            f"{', '.join(installed) or '(none)'}{broken}"
        )

    def failed_for(self, name: str) -> list[PluginRecord]:
        """The plugins that failed to load and would have provided the stage ``name``: an entry point of that name,
        or one whose error names it in quotes (``... the 'detectron2' region proposer is not available``)."""
        return [
            r
            for r in self.records
            if r.status == "error"
            and (r.name == name or re.search(rf"['\"`]{re.escape(name)}['\"`]", r.cause or ""))
        ]

    def build(self, kind: str, name: str, config: BaseModel, context: BuildContext) -> Stage:
        """Build the stage ``name`` of ``kind`` from a validated config."""
        return self.get(kind, name).build(config, context)


def lazy_factory(target: str) -> Callable[[Any, BuildContext], Stage]:
    """The stage factory ``"package.module:function"``, importing its module on the first build only: a plugin that
    registers it loads without the heavy libraries its stages need (``groma plugins``, ``groma validate`` and
    ``groma --help`` stay fast)."""
    module, _, name = target.partition(":")

    def factory(config: Any, context: BuildContext) -> Stage:
        return getattr(importlib.import_module(module), name)(config, context)

    factory.__qualname__ = factory.__name__ = name
    factory.__doc__ = f"{target}, imported when first built"
    return factory


def lazy_exports(package: str, names: Mapping[str, str]) -> Callable[[str], Any]:
    """A module ``__getattr__`` (PEP 562) for ``package``: ``names`` maps each public name to the submodule (relative,
    ``".backbone"``) that defines it, imported on first access."""

    def __getattr__(attr: str) -> Any:
        if attr in names:
            return getattr(importlib.import_module(names[attr], package), attr)
        raise AttributeError(f"module {package!r} has no attribute {attr!r}")

    return __getattr__


def _owners(entries: list[StageEntry]) -> str:
    return " and ".join(sorted(f"{e.distribution} {e.version}" for e in entries))


def _cause(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}"


def _describe(exc: BaseException) -> str:
    frames = traceback.extract_tb(exc.__traceback__)
    where = f" (at {frames[-1].filename}:{frames[-1].lineno})" if frames else ""
    return f"{type(exc).__name__}: {exc}{where}"
