"""A registry: names of one kind of thing (a flow, a system, a layout, ...) -> their classes.

A spec names a ``kind``; the code that builds it looks the class up here, and every error names
the config field, the value and the allowed names (docs/architecture.md, Registries)::

    FLOWS: Registry[Flow] = Registry("flow")

    @FLOWS.register("affine_coupling")
    class AffineCouplingFlow(Flow): ...

    FLOWS.get("affine_coupling", "flow.kind")   # -> AffineCouplingFlow
    FLOWS.get("glow", "flow.kind")              # ValueError: flow.kind: 'glow' is not a known
                                                # flow; choose one of affine_coupling, ...

A registry is a read-only mapping name -> class in the order of registration (``in``,
``len``, iteration over the names, ``registry[name]``, ``dict(registry)``); only
:meth:`Registry.register` adds to it. It does not change the classes it holds; a class that has
a ``kind`` attribute must be registered under that name.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from typing import Generic, TypeVar

__all__ = ["Registry"]

T = TypeVar("T")


class Registry(Mapping[str, type[T]], Generic[T]):
    """Classes of one kind of thing by name; ``what`` names that kind in messages ("flow")."""

    def __init__(self, what: str) -> None:
        self.what = what
        self._classes: dict[str, type[T]] = {}

    def register(self, name: str) -> Callable[[type[T]], type[T]]:
        """Class decorator: add the class under ``name`` (ValueError if the name is taken or
        the class's own ``kind`` differs) and return it unchanged."""
        if not isinstance(name, str) or not name:
            raise ValueError(f"name: {name!r} is not allowed; need a non-empty string")

        def add(cls: type[T]) -> type[T]:
            if name in self._classes:
                raise ValueError(f"{self.what} {name!r} is registered already "
                                 f"({self._classes[name].__qualname__})")
            kind = getattr(cls, "kind", name)
            if kind != name:
                raise ValueError(f"{cls.__qualname__}.kind is {kind!r}; register it under "
                                 "that name")
            self._classes[name] = cls
            return cls

        return add

    def get(self, name: object, field: str = "kind") -> type[T]:  # type: ignore[override]
        """The class registered as ``name``; ValueError "<field>: <name!r> is not a known
        <what>; choose one of a, b, c" otherwise (also for a name that is not a string)."""
        if not isinstance(name, str) or name not in self._classes:
            raise ValueError(f"{field}: {name!r} is not a known {self.what}; choose one of "
                             f"{', '.join(self._classes)}")
        return self._classes[name]

    def names(self) -> list[str]:
        """The registered names, in the order they were registered."""
        return list(self._classes)

    def __getitem__(self, name: str) -> type[T]:
        return self._classes[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._classes)

    def __len__(self) -> int:
        return len(self._classes)

    def __repr__(self) -> str:
        return f"Registry({self.what!r}: {', '.join(self._classes)})"
