"""One small registry, used for every axis of the science a spec chooses by name: systems,
flows, bases, reference samplers, objectives and energy backends.

A registry maps a name (the spec's ``kind``, ``sampler``, ``objective`` or ``backend`` value)
to a class. Adding a new choice is one decorated class in the science package::

    OBJECTIVES = Registry[Objective]("objective", field="training.objective")

    @OBJECTIVES.register("reverse_kl")
    class ReverseKL(Objective): ...

Lookups of unknown names raise ValueError in the spec's one-line form,
``<field>: <value> is not a known <what>; choose one of a, b, c``, which the campaign turns
into its message for the user (field, value, what is allowed). Registration is open at run
time: a class registered by a notebook or a test is found by the same lookups as the built-in
ones, with no change anywhere else.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Generic, TypeVar

T = TypeVar("T")


class Registry(Generic[T]):
    """Names -> classes for one axis of choice; ``what`` names the axis in messages and
    ``field`` the spec field that holds the name."""

    def __init__(self, what: str, field: str) -> None:
        self.what = what
        self.field = field
        self._classes: dict[str, type[T]] = {}

    def register(self, name: str) -> Callable[[type[T]], type[T]]:
        """Class decorator: register the class under ``name`` (set as its ``name`` attribute);
        a name already taken by another class is refused."""

        def add(cls: type[T]) -> type[T]:
            taken = self._classes.get(name)
            if taken is not None and taken is not cls:
                raise ValueError(f"{self.field}: {name!r} is already registered "
                                 f"({taken.__module__}.{taken.__qualname__})")
            self._classes[name] = cls
            cls.name = name  # type: ignore[attr-defined]
            return cls

        return add

    def unregister(self, name: str) -> None:
        """Remove ``name`` (tests that register a class of their own clean up with this)."""
        self._classes.pop(name, None)

    def get(self, name: object) -> type[T]:
        """The class registered as ``name``; ValueError naming the field, the value and the
        names allowed otherwise."""
        if not isinstance(name, str) or name not in self._classes:
            raise ValueError(f"{self.field}: {name!r} is not a known {self.what}; choose one "
                             f"of {', '.join(self._classes)}")
        return self._classes[name]

    def names(self) -> list[str]:
        """The registered names, in the order they were registered."""
        return list(self._classes)

    def __contains__(self, name: object) -> bool:
        return name in self._classes

    def __iter__(self) -> Iterator[str]:
        return iter(list(self._classes))

    def items(self) -> list[tuple[str, type[T]]]:
        return list(self._classes.items())

    def __len__(self) -> int:
        return len(self._classes)
