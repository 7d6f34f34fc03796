"""The one exception type users see.

Every bad input (unknown model, unreadable file, conflicting options, a layer we cannot replace) is
raised as :class:`GNSurgeonError` with one sentence that names the thing at fault. The CLI prints it
and exits with code 2; the Python API lets it propagate.

Stage: a leaf, below every stage. It imports nothing of gnsurgeon (and no torch).
"""


class GNSurgeonError(Exception):
    """A user-facing error: a bad input, explained in one sentence."""


class VerificationError(GNSurgeonError):
    """A numerical check failed (converted outputs not finite, folded model disagrees, ...).

    The CLI exits with code 1 for these: the input was fine, the result is not trustworthy.
    """


def first_line(exc: BaseException, limit: int = 240) -> str:
    """The first non-empty line of an exception's message (its type name when it has none): what a
    one-sentence error quotes from a library's multi-line message."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    return (lines[0] if lines else type(exc).__name__)[:limit]
