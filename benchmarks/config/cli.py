"""The command-line layer of every entry point: one declarative `Spec` per command (purpose, keys with type,
default and help, flags, the names it accepts, examples), one parser (`parse`), `--help`, and one error path.

    SPEC = Spec("python -m benchmarks.report", "Write a grid's report.", keys=(Key("grid", "...", required=True),),
                examples=("python -m benchmarks.report grid=smoke",))

    @command(spec=SPEC)
    def main(argv: list[str]) -> int:
        args = parse(SPEC, argv)          # Args: .values (the spec's keys given), .overrides, .flags
        ...

Arguments are `key=value` (OmegaConf dotlist syntax for config overrides: a command whose spec has
`overrides` passes every key=value it does not know through, as a config override) and `--flags`.
`-h`/`--help` anywhere prints the help (the accepted names are computed at help time from the config
folders and registries) and exits 0. A bad argument (not key=value, an unknown key or flag, a value of the
wrong type or outside its choices, a missing required key) is a ConfigError: one line and exit status 2.

A known failure is one line `error: <message>` on stderr and exit status 2; anything else is a bug and
keeps its traceback (exit status 1).

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
import textwrap
import traceback
from dataclasses import dataclass, field
from typing import Callable, Sequence, Union

import yaml

from benchmarks.config.gridfile import available
from core.config import ConfigError
from core.errors import CheckpointError, CorruptFileError, NonFiniteError
from core.torchfile import UntrustedFileError

DEBUG_FLAG = "--debug"
DEBUG_ENV = "SEMPRIOR_DEBUG"
HELP_FLAGS = ("-h", "--help")
COMPLETION_FLAG = "--completion"

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
    """The suite's own user-facing kinds (core/errors.py, core/config.py)."""
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
            known: tuple[type[BaseException], ...] = (), spec: "Spec | None" = None) -> Callable:
    """Wrap a command's `main(argv) -> int` in the one error path. `known` adds exception types that this
    command raises only for bad input (e.g. ValueError from the ADM evaluator's shape checks). With `spec`,
    `-h`/`--help` anywhere prints `help_text(spec)` and returns 0 before `main` runs, and
    `--completion bash` prints a bash completion script."""
    def wrap(fn: Callable[[list[str]], int]) -> Callable[[list[str] | None], int]:
        @functools.wraps(fn)
        def wrapper(argv: list[str] | None = None) -> int:
            args, debug = split_debug(list(sys.argv[1:] if argv is None else argv))
            try:
                if spec is not None and any(a in HELP_FLAGS for a in args):
                    return _emit(help_text(spec))
                if spec is not None and COMPLETION_FLAG in args:
                    return _emit(completion_script(spec, args))
                return fn(args)
            except Exception as e:  # noqa: BLE001 - sorted into known failures and bugs below
                if not is_known(e, known):
                    raise                        # a bug: Python prints the traceback and exits with 1
                if debug:
                    traceback.print_exc()
                print(f"error: {message(e)}", file=sys.stderr)
                return 2
        wrapper.spec = spec                      # type: ignore[attr-defined] - for tests and completion
        return wrapper
    return wrap(main) if main is not None else wrap


def _emit(text: str) -> int:
    """Print the help or completion text; a reader that closed the pipe early (`| head`) is no error."""
    try:
        print(text, flush=True)
    except BrokenPipeError:
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())   # Python's flush at exit stays quiet
    return 0


# ----------------------------------------------------------------------------- declarative specs
Names = Union[Sequence[str], Callable[[], Sequence[str]]]


@dataclass(frozen=True)
class Key:
    """One `key=value` argument.

    type: "str" (any text), "path" (a file or folder), "int" (an integer, ≥ `low` when given), "float",
    or "choice" (one of `choices`: a tuple, or a function called when the value is checked or the help is
    printed, e.g. the registered methods). many: a comma list, every item checked. noun: for a choice that
    names things ("method"), the error says "unknown method 'x'". default: as the help shows it (None: none).
    check_value=False: the command checks the value itself (a message of its own that names the fix).
    complete: names offered by shell completion for a key that is not a choice (grids: a path works too).
    """
    name: str
    help: str
    type: str = "str"
    default: str | None = None
    required: bool = False
    low: int | None = None
    choices: Names | None = None
    many: bool = False
    noun: str = ""
    metavar: str = ""
    check_value: bool = True
    complete: Names | None = None


    def valid(self) -> list[str]:
        """The accepted values of a choice (computed now: registries and config folders can grow)."""
        c = self.choices() if callable(self.choices) else self.choices
        return list(c or ())

    def shown(self) -> str:
        """`name=METAVAR` for the usage and help lines."""
        if self.metavar:
            meta = self.metavar
        elif self.type == "choice" and not callable(self.choices):
            meta = "|".join(self.valid())
        else:
            meta = {"int": "N", "float": "X", "path": "PATH", "choice": "NAME"}.get(self.type, "VALUE")
        return f"{self.name}={meta}{',...' if self.many else ''}"

    def check(self, value: str) -> None:
        """ConfigError naming the key, the value and what is valid; nothing for a good value."""
        if not self.check_value:
            return
        items = value.split(",") if self.many else [value]
        for item in items:
            if self.type == "int":
                ok = item.strip().lstrip("-").isdigit() and (self.low is None or int(item) >= self.low)
                if not ok:
                    need = f"an integer ≥ {self.low}" if self.low is not None else "an integer"
                    raise ConfigError(f"{self.name}={value}: {item!r} is not {need}")
            elif self.type == "float":
                try:
                    float(item)
                except ValueError:
                    raise ConfigError(f"{self.name}={value}: {item!r} is not a number") from None
            elif self.type == "choice":
                valid = self.valid()
                if item not in valid:
                    if self.noun:
                        raise ConfigError(f"{self.name}={value}: unknown {self.noun} {item!r}; "
                                          f"valid: {', '.join(valid)}")
                    raise ConfigError(f"{self.name}={value}: {item!r} is not one of {', '.join(valid)}")


def config_names(kind: str) -> Callable[[], list[str]]:
    """The names --help and completion list for a config kind ("grid", "profile", "method"): the package's
    YAMLs plus those in SEMPRIOR_CONFIG_PATH, read when asked (read from disk each time)."""
    def names() -> list[str]:
        return available(kind)
    return names


@dataclass(frozen=True)
class Flag:
    """A `--flag` (no value)."""
    name: str
    help: str


@dataclass(frozen=True)
class Spec:
    """A command's whole command line.

    prog: how it is started ("python -m benchmarks.run"); purpose: one paragraph; keys/flags: what it takes;
    names: (title, names or a function returning them) listed by --help, e.g. ("grids", lambda: available("grid"));
    examples: two or more full command lines. overrides: help for key=value pairs that are not keys of the
    spec (passed through as config overrides, OmegaConf dotlist); "" means such a pair is an error.
    override_prefixes: when given, only keys with one of these prefixes pass through. one_of: key groups of
    which exactly one must be given. positional: help for plain (not key=value) arguments, shown as
    positional_metavar in the usage; "" means none are accepted (the command reads Args.positional).
    """
    prog: str
    purpose: str
    keys: tuple[Key, ...] = ()
    examples: tuple[str, ...] = ()
    flags: tuple[Flag, ...] = ()
    names: tuple[tuple[str, Names], ...] = ()
    overrides: str = ""
    override_prefixes: tuple[str, ...] = ()
    one_of: tuple[tuple[str, ...], ...] = ()
    positional: str = ""
    positional_metavar: str = ""

    def key(self, name: str) -> Key:
        return next(k for k in self.keys if k.name == name)

    @property
    def key_names(self) -> list[str]:
        return [k.name for k in self.keys]

    def usage(self) -> str:
        parts = [self.prog]
        if self.positional_metavar:
            parts.append(self.positional_metavar)
        for group in self.one_of:
            parts.append("(" + " | ".join(self.key(n).shown() for n in group) + ")")
        grouped = {n for g in self.one_of for n in g}
        parts += [k.shown() if k.required else f"[{k.shown()}]" for k in self.keys if k.name not in grouped]
        if self.overrides:
            parts.append(f"[{'|'.join(p + 'KEY' for p in self.override_prefixes) or 'key'}=value ...]")
        parts += [f"[{f.name}]" for f in self.flags]
        return " ".join(parts)

    def hint(self) -> str:
        return f"see {self.prog} --help"


BUILTIN_FLAGS = (Flag(DEBUG_FLAG, f"print the traceback of a known failure too (or {DEBUG_ENV}=1)"),
                 Flag("-h, --help", "print this help and exit"))


def _names(names: Names) -> list[str]:
    try:
        return list(names() if callable(names) else names)
    except Exception as e:  # noqa: BLE001 - the help still prints when a plugin fails to load
        return [f"(could not list: {message(e)})"]


def help_text(spec: Spec) -> str:
    """The --help page: usage, purpose, keys (type, default, help), flags, accepted names, examples."""
    def block(rows: list[tuple[str, str]]) -> list[str]:
        width = min(max((len(a) for a, _ in rows), default=0), 28)
        out = []
        for a, b in rows:
            lines = textwrap.wrap(b, 100 - width - 4, break_on_hyphens=False, break_long_words=False) or [""]
            if len(a) > width:
                out.append(f"  {a}")
                out += [f"  {'':{width}}  {line}" for line in lines]
            else:
                out.append(f"  {a:{width}}  {lines[0]}")
                out += [f"  {'':{width}}  {line}" for line in lines[1:]]
        return out

    usage = textwrap.wrap(f"usage: {spec.usage()}", 100, subsequent_indent=" " * (7 + len(spec.prog) + 1),
                          break_on_hyphens=False, break_long_words=False)
    lines = [*usage, "", *textwrap.wrap(spec.purpose, 100), ""]
    if spec.positional:
        lines += ["arguments:", *block([(spec.positional_metavar, spec.positional)]), ""]
    if spec.keys:
        rows = []
        for k in spec.keys:
            kind = k.type + (f" ≥ {k.low}" if k.low is not None else "") + (", comma list" if k.many else "")
            dflt = "required" if k.required else ("no default" if k.default is None else f"default {k.default}")
            valid = ""
            if k.type == "choice" and callable(k.choices):
                valid = f" (valid: {', '.join(_names(k.choices))})"
            rows.append((k.shown(), f"[{kind}; {dflt}] {k.help}{valid}"))
        lines += ["keys:", *block(rows), ""]
    if spec.one_of:
        lines += [f"give exactly one of: {' or '.join('/'.join(g) for g in spec.one_of)}", ""]
    if spec.overrides:
        lines += ["other key=value:", *textwrap.wrap(spec.overrides, 96, initial_indent="  ",
                                                       subsequent_indent="  "), ""]
    lines += ["flags:", *block([(f.name, f.help) for f in (*spec.flags, *BUILTIN_FLAGS)]), ""]
    if spec.names:
        lines.append("accepted names:")
        lines += block([(title, ", ".join(_names(n))) for title, n in spec.names])
        lines.append("")
    if spec.examples:
        lines += ["examples:", *(f"  {e}" for e in spec.examples)]
    return "\n".join(lines).rstrip()


@dataclass
class Args:
    """A parsed command line. values: the spec's keys that were given (raw strings, checked);
    overrides: the other key=value pairs in order (a dotlist); flags: the --flags given; positional: the rest."""
    values: dict[str, str] = field(default_factory=dict)
    overrides: list[str] = field(default_factory=list)
    flags: set[str] = field(default_factory=set)
    positional: list[str] = field(default_factory=list)

    def __contains__(self, key: str) -> bool:
        return key in self.values

    def __getitem__(self, key: str) -> str:
        return self.values[key]

    def get(self, key: str, default: str | None = None) -> str | None:
        return self.values.get(key, default)

    def int(self, key: str, default: int | None = None) -> int | None:
        return int(self.values[key]) if key in self.values else default


def parse(spec: Spec, argv: Sequence[str]) -> Args:
    """Check every argument against `spec` (nothing is dropped): ConfigError in one line naming the
    argument and what is valid, before anything loads or is written."""
    args = Args()
    flags = [f.name for f in spec.flags]
    for a in argv:
        key = a.split("=", 1)[0]
        if a.startswith("-"):                            # a flag (also --flag=value, which no command takes)
            if a not in flags:
                valid = ", ".join([*flags, DEBUG_FLAG, "--help"])
                raise ConfigError(f"unknown flag {a!r}; valid: {valid}; {spec.hint()}")
            args.flags.add(a)
        elif "=" in a and key in spec.key_names:
            spec.key(key).check(a.split("=", 1)[1])
            args.values[key] = a.split("=", 1)[1]
        elif spec.positional and ("=" not in a or not spec.overrides):
            args.positional.append(a)                    # a plain argument (a folder name may hold '=')
        elif "=" not in a:
            raise ConfigError(f"argument {a!r} is not key=value (e.g. {_example_pair(spec)}); {spec.hint()}")
        elif spec.overrides and (not spec.override_prefixes or key.startswith(spec.override_prefixes)):
            if not key.strip():
                raise ConfigError(f"argument {a!r} has no key before '='; {spec.hint()}")
            args.overrides.append(a)
        else:
            valid = ", ".join([*spec.key_names, *(p + "KEY" for p in spec.override_prefixes)])
            raise ConfigError(f"unknown key {key!r}; valid: {valid}; {spec.hint()}")
    missing = [k.name for k in spec.keys if k.required and k.name not in args.values]
    if missing:
        raise ConfigError(f"missing {', '.join(spec.key(k).shown() for k in missing)}; {spec.hint()}")
    for group in spec.one_of:
        if sum(n in args.values for n in group) != 1:
            raise ConfigError(f"give {' or '.join(spec.key(n).shown() for n in group)}, exactly one "
                              f"(e.g. {spec.examples[0] if spec.examples else spec.prog}); {spec.hint()}")
    return args


def _example_pair(spec: Spec) -> str:
    """A key=value from the spec's first example, for the 'not key=value' message."""
    for e in spec.examples:
        pair = next((w for w in e.split() if "=" in w), None)
        if pair:
            return pair
    return "key=value"


def completion_script(spec: Spec, argv: Sequence[str]) -> str:
    """`<command> --completion bash`: a bash completion function for the command's keys, flags and the
    values of its choice keys (the names as of now; `eval "$(python -m benchmarks.run --completion bash)"`)."""
    shell = argv[argv.index(COMPLETION_FLAG) + 1] if argv.index(COMPLETION_FLAG) + 1 < len(argv) else ""
    if shell != "bash":
        raise ConfigError(f"--completion {shell or '(nothing)'}: only bash is supported; "
                          f"e.g. eval \"$({spec.prog} --completion bash)\"")
    words = [f"{k.name}=" for k in spec.keys] + [f.name for f in spec.flags] + ["--help", DEBUG_FLAG]
    cases = []
    for k in spec.keys:
        offered = k.choices if k.type == "choice" else k.complete
        if offered is not None:                      # bash splits "grid=sm" at '=' (COMP_WORDBREAKS) or not
            cases.append(f'        {k.name}=*) COMPREPLY=($(compgen -W "{" ".join(_names(offered))}" -- "${{cur#{k.name}=}}"))\n'
                         f'            [[ $COMP_WORDBREAKS == *=* ]] || COMPREPLY=("${{COMPREPLY[@]/#/{k.name}=}}"); return 0;;')
    target = spec.prog.split()[-1]                   # benchmarks.run, scripts/prepare_twice.py
    fn = "_semprior_cmd_" + "".join(c if c.isalnum() else "_" for c in target)
    return "\n".join([
        f"# bash completion for {spec.prog}: eval \"$({spec.prog} --completion bash)\"; the scripts of several",
        "# commands add up (one dispatcher tries each command's function)",
        f"{fn}() {{",
        "    local line=${COMP_LINE:0:COMP_POINT}; local cur=${line##* }",
        f'    [[ " ${{COMP_WORDS[*]}} " == *" {target} "* ]] || return 0',
        '    case "$cur" in',
        *cases,
        "    esac",
        f"    COMPREPLY=($(compgen -W \"{' '.join(words)}\" -- \"$cur\"))",
        "}",
        "_semprior_complete() {",
        "    local f; COMPREPLY=()",
        "    for f in $(compgen -A function _semprior_cmd_); do",
        '        "$f"; [[ ${#COMPREPLY[@]} -gt 0 ]] && return 0',
        "    done",
        "}",
        "complete -o default -o nospace -F _semprior_complete python python3"])
