"""Errors growprune raises for bad user input, so the command line can report them in one line."""

from __future__ import annotations


class ConfigurationError(ValueError):
    """A bad configuration (a value, a file, a schedule that cannot run) found before any state changed.

    The ``growprune`` command prints it as one ``growprune: error: ...`` line and exits with code 2;
    from Python it is a ``ValueError``.
    """
