"""Errors the command line turns into one clear line and exit code 2."""

from __future__ import annotations

_NO_VALUE = object()


class SpecError(ValueError):
    """Bad user input: a spec field, its value and what is allowed.

    The message is one line, ``<field>: <value> is not allowed; <what is allowed>``, so that the
    CLI can print it as it is. ``detail`` replaces everything after the field when another layer
    (the science package) already wrote the explanation.
    """

    def __init__(
        self, field: str, value: object = _NO_VALUE, allowed: str = "", *, detail: str = ""
    ) -> None:
        self.field = field
        self.detail = detail or (
            f"{_show(value)} is not allowed; {allowed}" if value is not _NO_VALUE else allowed
        )
        super().__init__(f"{field}: {self.detail}")

    def at(self, field: str) -> SpecError:
        """The same complaint about another field path (e.g. the grid axis it came from)."""
        return SpecError(field, detail=self.detail)


def _show(value: object) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."
