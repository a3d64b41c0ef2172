"""Errors the job turns into exit codes.

``InvalidInputError`` covers everything a user must fix in the request, model or
data (exit code 4, never retried); its message is one line that names the
field or file and what to change. ``DivergedError`` is raised by the training
loops when a loss stops being finite: that is a failed attempt (the tuner
retries with a smaller learning rate), not an input error.
"""

from __future__ import annotations


class InvalidInputError(ValueError):
    """The request, model or data cannot be used as given; the message says what to change."""


class DivergedError(RuntimeError):
    """A training loss became NaN/inf or exploded during an unlearning attempt."""
