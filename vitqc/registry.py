"""One registration mechanism for everything vitqc finds by name: passes, calibration sources, backends.

Each kind has a :class:`Registry`. A built-in registers with the registry's decorator in its own module; a
third-party package adds its own through a Python entry point in the registry's group, e.g. in its
``pyproject.toml``::

    [project.entry-points."vitqc.passes"]
    keep_layer_at = "my_package.passes"          # a module that registers with @vitqc.register_pass

    [project.entry-points."vitqc.backends"]
    tflite = "my_package.tflite:TfliteBackend"    # or the class itself (registered under its ``name``)

Entry points are loaded the first time a registry is asked for a name it does not know, or for its list.
``vitqc passes``, ``vitqc sources`` and ``vitqc backends`` list what is registered.
"""
from __future__ import annotations

import importlib
from importlib import metadata
from typing import Any, Callable, Generic, Iterator, TypeVar

from vitqc.errors import VitqcError

__all__ = ["Registry"]

T = TypeVar("T")


class Registry(Generic[T]):
    """Name -> object, filled by a decorator, the built-in modules and the ``group`` entry points.

    ``builtins`` names the modules to import (once) before looking anything up: importing them registers
    the built-ins. ``check(name, obj)`` validates an object before it is registered.
    """

    def __init__(self, kind: str, group: str, builtins: tuple[str, ...] = (),
                 check: Callable[[str, T], None] | None = None, list_command: str = "") -> None:
        self.kind = kind
        self.group = group
        self._builtins = builtins
        self._check = check
        self._items: dict[str, T] = {}
        self._loaded_builtins = False
        self._loaded_entry_points = False
        self._list_command = list_command

    def register(self, obj: T | None = None, *, name: str | None = None) -> Any:
        """``@registry.register`` (the object's ``name`` attribute) or ``@registry.register(name="x")``."""

        def add(item: T) -> T:
            key = name or getattr(item, "name", "")
            if not key:
                raise TypeError(f"{item!r}: a {self.kind} needs a `name`")
            if self._check is not None:
                self._check(key, item)
            known = self._items.get(key)
            if known is not None and _identity(known) != _identity(item):
                raise TypeError(f"{self.kind} name {key!r} is taken by {_identity(known)}")
            self._items[key] = item
            return item

        return add if obj is None else add(obj)

    def _load_builtins(self) -> None:
        if not self._loaded_builtins:
            self._loaded_builtins = True
            for module in self._builtins:
                importlib.import_module(module)

    def _load_entry_points(self) -> None:
        if self._loaded_entry_points:
            return
        self._loaded_entry_points = True
        for entry in metadata.entry_points(group=self.group):
            try:
                loaded = entry.load()
            except Exception as exc:  # noqa: BLE001 - a broken plugin is the user's one-line error
                raise VitqcError(f"the {self.kind} plugin {entry.name!r} ({entry.value}, entry point group "
                                 f"{self.group!r}) failed to load: {type(exc).__name__}: {exc}") from None
            if not isinstance(loaded, type(importlib)) and entry.name not in self._items:
                self.register(loaded, name=getattr(loaded, "name", None) or entry.name)

    def get(self, name: str) -> T:
        self._load_builtins()
        if name not in self._items:
            self._load_entry_points()
        try:
            return self._items[name]
        except KeyError:
            hint = f"`{self._list_command}` lists them" if self._list_command else "known"
            raise VitqcError(f"unknown {self.kind} {name!r}; {hint}: {', '.join(self.names())}") from None

    def __contains__(self, name: str) -> bool:
        self._load_builtins()
        self._load_entry_points()
        return name in self._items

    def names(self) -> list[str]:
        return list(self.items())

    def items(self) -> dict[str, T]:
        self._load_builtins()
        self._load_entry_points()
        return dict(sorted(self._items.items()))

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())


def _identity(obj: Any) -> str:
    return f"{getattr(obj, '__module__', '?')}.{getattr(obj, '__qualname__', repr(obj))}"
