"""Command-line error reporting: bad input becomes one line naming the problem and the fix."""

from __future__ import annotations

from hydra.errors import HydraException
from omegaconf.errors import OmegaConfBaseException

from recipes.errors import RecipeError

_HINT = "run `python train.py --help` for the groups and `python train.py --cfg job` for every key"


def is_user_error(e: BaseException) -> bool:
    """Errors caused by the command line, the config or the data, as opposed to bugs."""
    return isinstance(e, (RecipeError, HydraException, OmegaConfBaseException))


def _cause(e: BaseException) -> BaseException:
    while isinstance(e, HydraException) and e.__cause__ is not None:
        e = e.__cause__
    return e


def format_user_error(e: BaseException) -> str:
    """One line: what is wrong and how to fix it."""
    if isinstance(e, RecipeError):
        return str(e)
    cause = _cause(e)
    if isinstance(cause, OmegaConfBaseException):
        message = str(getattr(cause, "msg", "") or cause).strip().splitlines()[0]
        key = getattr(cause, "full_key", None)
        where = f" ({key})" if key and key not in message else ""
        return f"{message}{where}: {_HINT}"
    text = str(e).split("Config search path")[0]
    lines = [line.strip().rstrip(":") for line in text.strip().splitlines() if line.strip()]
    if len(lines) > 1 and lines[1].startswith("Available options"):
        return f"{lines[0]}; {lines[1].lower()}: {', '.join(lines[2:])}"
    return "; ".join(lines) + f" ({_HINT})"
