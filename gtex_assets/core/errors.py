"""The one error type for bad user data: it names the input and what is wrong with it.

``lib`` raises :class:`InputError` (or a subclass) for anything a user can fix — a malformed
file, a missing column, an unknown model name; ``defs`` turns it into a ``dg.Failure`` whose
description is the message (no traceback wall in the UI). Programming errors stay ordinary
exceptions so their tracebacks are kept.
"""

from __future__ import annotations


class InputError(ValueError):
    """Bad input. ``source`` names the file/row/sample, ``fix`` says how to proceed."""

    def __init__(self, source: str, problem: str | None = None, fix: str | None = None) -> None:
        # One argument: a message that already names the input (subclasses with their own
        # wording, e.g. the GCT parser's "file line N, column M: ...").
        self.source, self.problem, self.fix = source, problem, fix
        msg = source if problem is None else f"{source}: {problem}"
        super().__init__(msg + (f"; {fix}" if fix else ""))
