"""The one exception type users see: its message is a single line naming the problem and the fix."""


class MicrotuneError(ValueError):
    """Bad input or state that the user can fix; the CLI prints it as one line."""
