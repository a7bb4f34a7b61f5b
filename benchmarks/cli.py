"""One error path for every command: a known failure is one line `error: <message>` on stderr and exit
status 2; anything else is a bug and keeps its traceback (exit status 1).

    @command
    def main(argv: list[str] | None = None) -> int: ...

    if __name__ == "__main__":
        sys.exit(main())

Known failures are the suite's user-facing kinds (ConfigError, CorruptFileError, NonFiniteError,
UntrustedFileError, CheckpointError), a missing file, a folder that cannot be written (no permission,
read-only file system, no space, a path through a file) and a file that is not valid YAML. `--debug`
anywhere on the command line (removed before the command parses its arguments) or SEMPRIOR_DEBUG=1 prints
the traceback of a known failure too. Tests call the decorated `main([...])` directly: it returns 2.
"""
from __future__ import annotations

import errno
import functools
import os
import sys
import traceback
from typing import Callable

import yaml

from core.config import ConfigError
from core.errors import CorruptFileError, NonFiniteError
from core.torchfile import UntrustedFileError

DEBUG_FLAG = "--debug"
DEBUG_ENV = "SEMPRIOR_DEBUG"

# File-system failures the user fixes (a path, a mode, a disk), with the fix to name.
FS_ERRNOS = {
    errno.EACCES: "permission denied: choose a folder you can write, or fix its mode",
    errno.EPERM: "operation not permitted: choose a folder you can write, or fix its mode",
    errno.EROFS: "read-only file system: choose a writable folder",
    errno.ENOSPC: "no space left on the device: free some or choose another disk",
    errno.EDQUOT: "disk quota exceeded: free some or choose another disk",
    errno.ENOTDIR: "a part of the path is a file, not a folder",
    errno.EISDIR: "is a folder, not a file",
    errno.ENOENT: "no such file or folder",
}


def _suite_errors() -> tuple[type[BaseException], ...]:
    """The suite's own user-facing kinds. CheckpointError lives in benchmarks.importers, which imports
    torch models: imported here lazily so that this module stays light."""
    from benchmarks.importers import CheckpointError

    return (ConfigError, CorruptFileError, NonFiniteError, UntrustedFileError, CheckpointError)


def is_known(e: BaseException, extra: tuple[type[BaseException], ...] = ()) -> bool:
    """True for a failure the user fixes (bad argument, file or folder), False for a bug."""
    if isinstance(e, (*_suite_errors(), yaml.YAMLError, *extra)):
        return True
    if isinstance(e, FileNotFoundError):
        return True
    return isinstance(e, OSError) and e.errno in FS_ERRNOS


def message(e: BaseException) -> str:
    """The failure as one line (multi-line messages are joined), naming the file where there is one."""
    if isinstance(e, yaml.MarkedYAMLError) and e.problem_mark is not None:
        mark = e.problem_mark
        text = f"{mark.name}: not valid YAML (line {mark.line + 1}, column {mark.column + 1}: {e.problem})"
    elif isinstance(e, OSError) and e.errno in FS_ERRNOS and e.strerror:
        where = " -> ".join(str(f) for f in (e.filename, e.filename2) if f is not None)
        text = f"{where}: {FS_ERRNOS[e.errno]}" if where else FS_ERRNOS[e.errno]
    else:
        text = str(e) or type(e).__name__
    return " ".join(line.strip() for line in text.splitlines() if line.strip())


def split_debug(argv: list[str]) -> tuple[list[str], bool]:
    """argv without --debug, and whether tracebacks were asked for (flag or environment)."""
    rest = [a for a in argv if a != DEBUG_FLAG]
    return rest, len(rest) != len(argv) or os.environ.get(DEBUG_ENV, "") not in ("", "0")


def command(main: Callable[[list[str]], int] | None = None, *,
            known: tuple[type[BaseException], ...] = ()) -> Callable:
    """Wrap a command's `main(argv) -> int` in the one error path. `known` adds exception types that this
    command raises only for bad input (e.g. ValueError from the ADM evaluator's shape checks)."""
    def wrap(fn: Callable[[list[str]], int]) -> Callable[[list[str] | None], int]:
        @functools.wraps(fn)
        def wrapper(argv: list[str] | None = None) -> int:
            args, debug = split_debug(list(sys.argv[1:] if argv is None else argv))
            try:
                return fn(args)
            except Exception as e:  # noqa: BLE001 - sorted into known failures and bugs below
                if not is_known(e, known):
                    raise                        # a bug: Python prints the traceback and exits with 1
                if debug:
                    traceback.print_exc()
                print(f"error: {message(e)}", file=sys.stderr)
                return 2
        return wrapper
    return wrap(main) if main is not None else wrap
