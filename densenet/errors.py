"""The one exception type for mistakes a user can fix (bad arguments, missing files).

The command line prints its message as one paragraph and exits non-zero without a traceback;
from Python it is a ``ValueError``, so callers can catch it the usual way.
"""


class UsageError(ValueError):
    """A mistake in what the user asked for; the message says what was wrong and what to do."""
