"""Settings from three places, one precedence: flags > FASTWORKER_* environment > TOML file >
defaults.

The file (`--config FILE.toml`, or $FASTWORKER_CONFIG) holds the long flag names with `_` for
`-` as keys (`allow_script`, `job_timeout`), lists for repeatable flags, TOML's own types for
the rest. An environment variable is FASTWORKER_ and the key upper-cased
(FASTWORKER_JOB_TIMEOUT=60); a repeatable flag's variable holds a comma-separated list. Every
value, wherever it came from, goes through the flag's own parser (its type and choices), so the
file and the environment are checked exactly as the command line is, before anything connects;
a wrong key, type or value is an error naming the key and where it came from.

The flags' parser (argparse) is the one schema: a new flag is a new key and a new variable.
"""

from __future__ import annotations

import argparse
import difflib
import os
import tomllib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ENV_PREFIX = "FASTWORKER_"
CONFIG_ENV = "FASTWORKER_CONFIG"
# Actions that are no settings: they act at once.
_NOT_SETTINGS = (argparse._HelpAction, argparse._VersionAction)
_TRUE = ("1", "true", "yes", "on")
_FALSE = ("0", "false", "no", "off", "")


class ConfigError(ValueError):
    """A key, type or value that cannot be used; the message names it and where it came from."""


@dataclass(frozen=True, slots=True)
class Option:
    """One setting: its key (the long flag name with `_`), the flag, and how to read a value."""

    key: str
    flag: str
    action: argparse.Action

    @property
    def dest(self) -> str:
        return self.action.dest

    @property
    def env(self) -> str:
        return ENV_PREFIX + self.key.upper()

    @property
    def repeatable(self) -> bool:
        return isinstance(self.action, argparse._AppendAction)

    @property
    def switch(self) -> bool:
        return isinstance(self.action, argparse._StoreTrueAction | argparse._StoreFalseAction)


def options(parser: argparse.ArgumentParser) -> dict[str, Option]:
    """The settings a parser takes, by key; `--config` itself is none."""
    found = {}
    for action in parser._actions:
        if isinstance(action, _NOT_SETTINGS):
            continue
        flags = [s for s in action.option_strings if s.startswith("--")]
        if not flags or flags[0] == "--config":
            continue
        key = flags[0][2:].replace("-", "_")
        found[key] = Option(key, flags[0], action)
    return found


@dataclass(slots=True)
class Resolved:
    """The parsed settings, and where each came from: "flag --x", "environment FASTWORKER_X",
    "file PATH" or "default"."""

    args: argparse.Namespace
    sources: dict[str, str]  # key -> where its value came from
    options: dict[str, Option]


def resolve(
    parser: argparse.ArgumentParser,
    argv: Sequence[str],
    environ: Mapping[str, str] | None = None,
) -> Resolved:
    """Parses `argv` with `parser`, filling what the flags leave out from the environment, then
    the file, then the parser's defaults. Raises ConfigError; argparse's own errors (a bad flag)
    exit as usual."""
    environ = os.environ if environ is None else environ
    opts = options(parser)
    defaults = {opt.dest: opt.action.default for opt in opts.values()}
    # First as argparse alone would: --help, --version and bad flags end here, as usual.
    parser.parse_args(list(argv))
    # Then what the command line gave, and only that: every default suppressed.
    for opt in opts.values():
        opt.action.default = argparse.SUPPRESS
    try:
        given = vars(parser.parse_args(list(argv)))
    finally:
        for opt in opts.values():
            opt.action.default = defaults[opt.dest]
    path = given.pop("config", None) or environ.get(CONFIG_ENV) or None
    from_file = read_file(Path(path), opts, parser) if path else {}
    values: dict[str, Any] = {}
    sources: dict[str, str] = {}
    for key, opt in opts.items():
        if opt.dest in given:
            values[opt.dest], sources[key] = given[opt.dest], f"flag {opt.flag}"
        elif opt.env in environ:
            values[opt.dest] = _from_env(opt, environ[opt.env], parser)
            sources[key] = f"environment {opt.env}"
        elif key in from_file:
            values[opt.dest], sources[key] = from_file[key], f"file {path}"
        else:
            values[opt.dest], sources[key] = defaults[opt.dest], "default"
    namespace = argparse.Namespace(**{**given, **values})
    namespace.config = path
    return Resolved(namespace, sources, opts)


def read_file(path: Path, opts: Mapping[str, Option], parser: argparse.ArgumentParser) -> dict:
    """The file's settings by key, each checked by its flag's parser."""
    try:
        with open(path, "rb") as f:
            table = tomllib.load(f)
    except OSError as exc:
        raise ConfigError(f"cannot read the config file {path}: {exc.strerror or exc}") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path} is not valid TOML: {exc}") from None
    values = {}
    for key, value in table.items():
        opt = opts.get(key)
        if opt is None:
            near = difflib.get_close_matches(key, list(opts), n=1)
            hint = f"; did you mean {near[0]!r}?" if near else ""
            raise ConfigError(f"{path}: unknown key {key!r}{hint}")
        values[key] = _from_file(opt, value, f"{path}: key {key!r}", parser)
    return values


def _from_file(opt: Option, value: Any, where: str, parser: argparse.ArgumentParser) -> Any:
    if opt.switch:
        if not isinstance(value, bool):
            raise ConfigError(f"{where} must be true or false, got {value!r}")
        return value
    if opt.repeatable:
        items = value if isinstance(value, list) else [value]
        return [_scalar(opt, item, where, parser) for item in items]
    if isinstance(value, list | dict):
        raise ConfigError(f"{where} takes one value, got {type(value).__name__} {value!r}")
    return _scalar(opt, value, where, parser)


def _from_env(opt: Option, text: str, parser: argparse.ArgumentParser) -> Any:
    where = f"environment variable {opt.env}"
    if opt.switch:
        lowered = text.strip().lower()
        if lowered not in _TRUE + _FALSE:
            raise ConfigError(f"{where} must be one of 1, 0, true, false, got {text!r}")
        return lowered in _TRUE
    if opt.repeatable:
        return [_scalar(opt, part.strip(), where, parser) for part in text.split(",") if part]
    return _scalar(opt, text, where, parser)


def _scalar(opt: Option, value: Any, where: str, parser: argparse.ArgumentParser) -> Any:
    """One value through the flag's own type and choices, as if it had been typed."""
    if isinstance(value, bool) or isinstance(value, dict | list):
        raise ConfigError(f"{where}: {value!r} is not a value {opt.flag} takes")
    text = value if isinstance(value, str) else str(value)
    convert = opt.action.type
    try:
        converted = convert(text) if callable(convert) else text
    except (argparse.ArgumentTypeError, TypeError, ValueError) as exc:
        reason = str(exc) or f"invalid value {text!r}"
        if isinstance(exc, ValueError) and not isinstance(exc, argparse.ArgumentTypeError):
            reason = f"invalid value {text!r}"
        raise ConfigError(f"{where}: {reason}") from None
    choices = opt.action.choices
    if choices is not None and converted not in choices:
        wanted = ", ".join(map(str, choices))
        raise ConfigError(f"{where}: {converted!r} is not one of {wanted}")
    return converted


def render(resolved: Resolved, effective: Mapping[str, Any]) -> str:
    """The effective settings as a TOML file one could start from, each line saying where its
    value came from. `effective` maps keys to final values (after the CLI's own defaults)."""
    lines = []
    for key in resolved.options:
        if key not in effective:
            continue
        value = effective[key]
        source = resolved.sources.get(key, "default")
        if value is None:
            lines.append(f"# {key} is not set  ({source})")
        else:
            lines.append(f"{key} = {_toml(value)}  # {source}")
    return "\n".join(lines)


def _toml(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, list | tuple):
        return "[" + ", ".join(_toml(item) for item in value) + "]"
    text = str(value).replace("\\", "\\\\").replace('"', '\\"')
    return f'"{text}"'


def preset(
    schema: argparse.ArgumentParser,
    keys: Sequence[str],
    argv: Sequence[str],
    environ: Mapping[str, str] | None = None,
) -> dict[str, Any]:
    """The values of `keys` from the environment and the --config file (found in `argv` or
    $FASTWORKER_CONFIG), checked by `schema`'s flags: for a command with a parser of its own
    (`fastworker dlq`) that reads the worker's settings as its defaults. Keys neither place
    sets are left out."""
    environ = os.environ if environ is None else environ
    opts = options(schema)
    path = _config_arg(argv) or environ.get(CONFIG_ENV) or None
    from_file = read_file(Path(path), opts, schema) if path else {}
    values = {}
    for key in keys:
        opt = opts[key]
        if opt.env in environ:
            values[key] = _from_env(opt, environ[opt.env], schema)
        elif key in from_file:
            values[key] = from_file[key]
    return values


def _config_arg(argv: Sequence[str]) -> str | None:
    for i, arg in enumerate(argv):
        if arg == "--config" and i + 1 < len(argv):
            return argv[i + 1]
        if arg.startswith("--config="):
            return arg.split("=", 1)[1]
    return None
