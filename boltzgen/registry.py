"""One small registry, used for every axis of the science a spec chooses by name: systems,
flows, layouts, priors, bases, reference samplers, objectives and energy backends
(docs/architecture.md, "Typed settings and registries").

A registry maps a name (the spec's ``kind``, ``sampler``, ``objective`` or ``backend`` value)
to a class. Adding a new choice is one decorated class in the science package::

    OBJECTIVES: Registry[Objective] = Registry("objective", field="training.objective")

    @OBJECTIVES.register("reverse_kl")
    class ReverseKL(Objective): ...

    OBJECTIVES.get("reverse_kl")   # -> ReverseKL
    OBJECTIVES.get("kl")           # ValueError: training.objective: 'kl' is not a known
                                   # objective; choose one of reverse_kl, ...

A registry is a read-only mapping name -> class in the order of registration (``in``,
``len``, iteration over the names, ``registry[name]``, ``dict(registry)``); only
:meth:`Registry.register` adds to it (and :meth:`Registry.unregister`, for tests, removes).
Registration is open at run time: a class registered by a notebook or a test is found by the
same lookups as the built-in ones, with no change anywhere else. A registered class gets the
name as its ``name`` attribute; one that has a ``kind`` attribute must be registered under it.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from typing import Generic, TypeVar

__all__ = ["Registry"]

T = TypeVar("T")


class Registry(Mapping[str, type[T]], Generic[T]):
    """Classes of one axis of choice by name; ``what`` names the axis in messages ("flow")
    and ``field`` the spec field that holds the name ("flow.kind")."""

    def __init__(self, what: str, field: str = "kind") -> None:
        self.what = what
        self.field = field
        self._classes: dict[str, type[T]] = {}

    def register(self, name: str) -> Callable[[type[T]], type[T]]:
        """Class decorator: add the class under ``name`` (ValueError if another class holds
        the name or the class's own ``kind`` differs) and return it."""
        if not isinstance(name, str) or not name:
            raise ValueError(f"name: {name!r} is not allowed; need a non-empty string")

        def add(cls: type[T]) -> type[T]:
            taken = self._classes.get(name)
            if taken is not None and taken is not cls:
                raise ValueError(f"{self.field}: {name!r} is already registered "
                                 f"({taken.__module__}.{taken.__qualname__})")
            kind = getattr(cls, "kind", name)
            if kind != name:
                raise ValueError(f"{cls.__qualname__}.kind is {kind!r}; register it under "
                                 "that name")
            self._classes[name] = cls
            cls.name = name  # type: ignore[attr-defined]
            return cls

        return add

    def unregister(self, name: str) -> None:
        """Remove ``name`` (tests that register a class of their own clean up with this)."""
        self._classes.pop(name, None)

    def get(self, name: object, field: str | None = None) -> type[T]:  # type: ignore[override]
        """The class registered as ``name``; ValueError "<field>: <name!r> is not a known
        <what>; choose one of a, b, c" otherwise (also for a name that is not a string)."""
        if not isinstance(name, str) or name not in self._classes:
            raise ValueError(f"{field or self.field}: {name!r} is not a known {self.what}; "
                             f"choose one of {', '.join(self._classes)}")
        return self._classes[name]

    def names(self) -> list[str]:
        """The registered names, in the order they were registered."""
        return list(self._classes)

    def __getitem__(self, name: str) -> type[T]:
        return self._classes[name]

    def __iter__(self) -> Iterator[str]:
        return iter(list(self._classes))

    def __len__(self) -> int:
        return len(self._classes)

    def __repr__(self) -> str:
        return f"Registry({self.what!r}: {', '.join(self._classes)})"
