"""Errors for people: one line saying what is wrong and where (file, key path, line).

`SpaceError` is a bad space (or best-configuration) file; `Checker` builds its message from the
file's YAML node tree; `first_line` and `error_line` shorten any exception to one line, and
`traceback_line` a traceback.
"""

from __future__ import annotations

import difflib
import re
from collections.abc import Collection, Iterable
from typing import Any

import yaml

from pipelines.schema import REQUIRED, SECTIONS


class SpaceError(ValueError):
    """A search-space file is wrong; the message is one line: `file: key.path: what (line N)`."""


def first_line(exc: BaseException) -> str:
    """The first line of an exception's message (its type's name when it has none): what a
    one-line error for a person says."""
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def error_line(exc: BaseException) -> str:
    """`Type: first line` of an exception (its type's name alone when it has no message)."""
    name = type(exc).__name__
    return f"{name}: {first_line(exc)}" if str(exc).strip() else name


def traceback_line(text: str | None) -> str:
    """The last `SomeError: message` line of a traceback (the reason a person needs)."""
    if not text:
        return "unknown error"
    lines = [ln.strip() for ln in text.strip().splitlines() if ln.strip()]
    for line in reversed(lines):
        if re.match(r"^[\w.]*(Error|Exception|Interrupt)\b", line):
            return line[:500]
    return lines[-1][:500] if lines else "unknown error"


def parse_yaml(text: str, name: str) -> tuple[Any, yaml.Node | None]:
    """The parsed document and its node tree (for line numbers in errors).

    Raises:
        SpaceError: Malformed YAML, with its line and column.
    """
    try:
        return yaml.safe_load(text), yaml.compose(text, Loader=yaml.SafeLoader)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark else ""
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise SpaceError(f"{name}: {where}malformed YAML: {problem}") from exc


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


class Checker:
    """Carries the file name and YAML node tree so every error can say where it is."""

    def __init__(self, path: str, root_node: yaml.Node | None) -> None:
        self.path = path
        self.root_node = root_node

    def error(self, keypath: str, message: str) -> SpaceError:
        line = self._line(keypath)
        where = f" (line {line})" if line else ""
        return SpaceError(f"{self.path}: {keypath}: {message}{where}")

    def _line(self, keypath: str) -> int | None:
        node, line = self.root_node, None
        for part in keypath.split("."):
            if not isinstance(node, yaml.MappingNode):
                break
            for key_node, value_node in node.value:
                if key_node.value == part:
                    node, line = value_node, key_node.start_mark.line + 1
                    break
            else:
                break
        return line

    def rejected(
        self, section: str, cls: type, exc: BaseException, keys: Collection[str], where: str = ""
    ) -> SpaceError:
        """A config dataclass (`cls`) rejected the fields under `section:`. Its message names the
        field it blames (`field: why`, the library's style): when that field is one of `keys`
        (those the file sets), the error points at its line; else at the section."""
        message = first_line(exc)
        key, _, why = message.partition(": ")
        if key in keys and why:
            return self.error(f"{section}.{key}", f"rejected by {cls.__name__}{where}: {why}")
        return SpaceError(f"{self.path}: {section}: rejected by {cls.__name__}{where}: {message}")

    def unknown(
        self, keypath: str, key: str, allowed: Iterable[str], what: str = "key"
    ) -> SpaceError:
        close = difflib.get_close_matches(key, list(allowed), n=1, cutoff=0.6)
        hint = f"did you mean '{close[0]}'?" if close else f"allowed: {', '.join(sorted(allowed))}"
        unknown = "unknown key" if what == "key" else f"unknown {what} '{key}'"
        return self.error(keypath, f"{unknown}; {hint}")

    def value(self, keypath: str, value: Any, kind: str) -> Any:
        if kind == "secondary":  # {metric: <name>, mode: max|min}
            given = self.mapping(keypath, value)
            for key in given:
                if key not in ("metric", "mode"):
                    raise self.unknown(f"{keypath}.{key}", str(key), {"metric", "mode"})
            return {
                "metric": self.value(f"{keypath}.metric", given.get("metric"), "str"),
                "mode": self.value(f"{keypath}.mode", given.get("mode"), "mode"),
            }
        ok = {
            "int": isinstance(value, int) and not isinstance(value, bool),
            "number": isinstance(value, int | float) and not isinstance(value, bool),
            "str": isinstance(value, str) and value != "",
            "bool": isinstance(value, bool),
            "mode": value in ("max", "min"),
        }[kind]
        if not ok:
            if kind in ("int", "number") and isinstance(value, str) and _is_number(value):
                raise self.error(
                    keypath,
                    f"{value!r} is text to YAML; write it with a decimal "
                    "point and a signed exponent, e.g. 1.0e-5",
                )
            want = {
                "int": "an integer",
                "number": "a number",
                "str": "a non-empty string",
                "bool": "true or false",
                "mode": "'max' or 'min'",
            }[kind]
            raise self.error(keypath, f"expected {want}, got {value!r}")
        return value

    def mapping(self, keypath: str, value: Any) -> dict:
        if not isinstance(value, dict):
            raise self.error(keypath, f"expected a mapping (key: value lines), got {value!r}")
        return value

    def section(self, name: str, value: Any) -> dict[str, Any]:
        spec = SECTIONS[name]
        value = {} if value is None else self.mapping(name, value)
        for key in value:
            if key not in spec:
                raise self.unknown(f"{name}.{key}", key, spec)
        out = {}
        for key, (kind, default) in spec.items():
            if key not in value:
                if default is REQUIRED:
                    raise self.error(name, f"missing required key '{key}'")
                out[key] = default
            else:
                out[key] = self.value(f"{name}.{key}", value[key], kind)
        return out
