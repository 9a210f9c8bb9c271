"""One exception type for everything a user can get wrong.

The CLI turns an AFMError into a one-line message and exit code 1; anything else is a bug and keeps its traceback.
"""


class AFMError(Exception):
    """Bad input: a missing or malformed file, an invalid option, an incompatible model."""
