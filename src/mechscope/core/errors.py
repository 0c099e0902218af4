"""mechscope's own errors: bad input that the user can fix, named with what is valid.

Every error a user can cause by passing something wrong derives from :class:`MechscopeError`.
The CLI prints these as one readable line; any other exception is a bug and keeps its
traceback (``mechscope --debug``). The subclasses also derive from the matching built-in
(``ValueError``, ``KeyError``, ``TypeError``, ``FileNotFoundError``) so ``except ValueError``
keeps working.
"""

from __future__ import annotations


class MechscopeError(Exception):
    """Base class of every input error mechscope raises on purpose."""


class InputError(MechscopeError, ValueError):
    """A value the user passed is out of range or inconsistent; the message says what is valid."""


class InputTypeError(MechscopeError, TypeError):
    """An argument of the wrong type (e.g. tokens where text was expected)."""


class UnknownNameError(MechscopeError, KeyError):
    """An unknown hook point, site, shorthand or option; the message lists close or valid names."""

    def __str__(self) -> str:  # KeyError would print the repr of the message
        return str(self.args[0]) if self.args else ""


class NotFoundError(MechscopeError, FileNotFoundError):
    """A file, folder or model that does not exist or is incomplete."""
