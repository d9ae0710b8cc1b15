"""The one exception type that reaches users as a message instead of a traceback.

Anything the user can fix (a missing folder, a bad checksum, an unknown model name) raises `UserError`
with a message that names the problem and, where useful, the valid choices. `askexpert.cli.main`
prints it on one line and exits non-zero; every other exception is a bug and keeps its traceback.
"""


class UserError(Exception):
    """A problem with the user's input, reported as one clear line."""
