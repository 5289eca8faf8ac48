"""The one exception type for errors a user can cause.

The CLI prints a `SalmaeError` as a single line (no traceback) and exits with code 2, so every
message must name the thing that is wrong (file, key, option) and say what to do about it.
"""


class SalmaeError(Exception):
    """A problem with the user's input, data or configuration, described in one line."""

    exit_code = 2
