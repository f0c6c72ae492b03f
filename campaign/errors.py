"""Errors the command line turns into one clear line and exit code 2."""

from __future__ import annotations

from boltzgen.settings import SettingError


class SpecError(SettingError):
    """Bad user input: a spec field, its value and what is allowed.

    The message is one line, ``<field>: <value> is not allowed; <what is allowed>``, so that the
    CLI can print it as it is. ``detail`` replaces everything after the field when another layer
    (the science package) already wrote the explanation. The science's own complaints about
    settings (:class:`boltzgen.settings.SettingError`) have the same form.
    """

    @classmethod
    def of(cls, err: SettingError) -> SpecError:
        return err if isinstance(err, SpecError) else cls(err.field, detail=err.detail)

    def at(self, field: str) -> SpecError:
        """The same complaint about another field path (e.g. the grid axis it came from)."""
        return SpecError(field, detail=self.detail)
