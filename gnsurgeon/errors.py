"""The one exception type users see.

Every bad input (unknown model, unreadable file, conflicting options, a layer we cannot replace) is
raised as :class:`GNSurgeonError` with one sentence that names the thing at fault. The CLI prints it
and exits with code 2; the Python API lets it propagate.
"""


class GNSurgeonError(Exception):
    """A user-facing error: a bad input, explained in one sentence."""


class VerificationError(GNSurgeonError):
    """A numerical check failed (converted outputs not finite, folded model disagrees, ...).

    The CLI exits with code 1 for these: the input was fine, the result is not trustworthy.
    """
