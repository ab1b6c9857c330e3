"""The one exception type that the CLI turns into a one-line message and a non-zero exit."""


class UserError(Exception):
    """Bad input or environment that the user can fix; the message says where and what to do."""

    exit_code = 2


def located(path, line: int | None, message: str) -> UserError:
    """A UserError whose message starts with `file:line:` so editors can jump to it."""
    where = f"{path}:{line}" if line is not None else f"{path}"
    return UserError(f"{where}: {message}")
