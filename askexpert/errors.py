"""The one exception type that reaches users as a message instead of a traceback.

Anything the user can fix (a missing folder, a bad checksum, an unknown model name) raises `UserError`
with a message that names the problem and, where useful, the valid choices. `askexpert.cli.main`
prints it on one line and exits non-zero; every other exception is a bug and keeps its traceback.
"""


class UserError(Exception):
    """A problem with the user's input, reported as one clear line."""


class DivergenceError(UserError):
    """Training produced a non-finite loss, gradient or weight (`askexpert.guard`); exit status 3.

    `step` and `epoch` locate the first bad step, `last_good` is the checkpoint that is still intact (or None),
    `stage` the pipeline stage that diverged (None for a plain `fit`).
    """

    exit_status = 3

    def __init__(
        self, message: str, step: int, epoch: int, last_good: str | None, stage: str | None = None
    ) -> None:
        super().__init__(message)
        self.step = step
        self.epoch = epoch
        self.last_good = last_good
        self.stage = stage

    def __reduce__(self):  # an exception crosses process boundaries by pickling: keep its fields
        return type(self), (str(self), self.step, self.epoch, self.last_good, self.stage)


def find_user_error(ex: BaseException | None) -> UserError | None:
    """The UserError behind an exception chain (e.g. one a class raised while jsonargparse built it)."""
    seen = set()
    while ex is not None and id(ex) not in seen:
        if isinstance(ex, UserError):
            return ex
        seen.add(id(ex))
        ex = ex.__cause__ or ex.__context__
    return None


def one_line_parse_error(message: str, prog: str, ex: BaseException | None) -> UserError:
    """What an argument parser raises instead of printing usage: the UserError inside, or the first lines."""
    user_error = find_user_error(ex)
    if user_error is not None:
        return user_error
    first_line = " ".join(line.strip() for line in message.strip().splitlines()[:2])
    return UserError(f"{first_line} (see `{prog} --help`)")
