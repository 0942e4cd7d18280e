"""YAML documents that remember where every value came from, and locate errors in them.

PyYAML's `safe_load` forgets line numbers, and config errors must name them (DESIGN.md:
`bridge.yaml:23: devices[0].points[3].type: …`). So the file is composed into nodes and built
into plain Python data by hand, recording the 1-based line of every mapping key and sequence
item under its path tuple, e.g. `("devices", 0, "points", 3, "type")`. Duplicate keys, which
`safe_load` silently resolves to the last one, are reported instead.

`Document.validation_issues` turns a pydantic ValidationError into ConfigIssues at those lines,
with short messages that never echo a value a secret reference went into.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError
from pydantic_core import ErrorDetails

from bridge.config.secrets import Loc, read_bounded, substitute
from bridge.errors import ConfigError, ConfigIssue


def render_path(path: Loc) -> str:
    """`("devices", 0, "points", 3, "type")` -> `devices[0].points[3].type`."""
    text = ""
    for part in path:
        if isinstance(part, int):
            text += f"[{part}]"
        else:
            text += f".{part}" if text else str(part)
    return text


@dataclass(frozen=True)
class Document:
    """One parsed YAML file: its data, the line of every path, and which paths hold secrets."""

    file: str
    data: Any
    lines: Mapping[Loc, int]
    secret_paths: frozenset[Loc] = frozenset()
    secret_values: frozenset[str] = frozenset()

    def line(self, path: Loc) -> int:
        """Line of the deepest recorded prefix of `path` (a missing key: its parent's line)."""
        for end in range(len(path), -1, -1):
            if path[:end] in self.lines:
                return self.lines[path[:end]]
        return 0

    def is_secret(self, path: Loc) -> bool:
        """Whether the value at `path`, or any value inside it, came from a secret reference."""
        return any(path[: len(s)] == s or s[: len(path)] == path for s in self.secret_paths)

    def issue(self, path: Loc, message: str) -> ConfigIssue:
        """A ConfigIssue located at `path` in this file."""
        return ConfigIssue(self.file, self.line(path), render_path(path), message)

    def show(self, path: Loc, value: Any = None) -> str:
        """`repr` of the value at `path` for a message; `<secret>` if a secret went into it."""
        if self.is_secret(path):
            return "<secret>"
        if value is None:
            value = _node(self.data, path)
        return repr(value)

    def items(self, at: str | Loc) -> list[Any]:
        """The list at `at` (a top-level key or a path), or [] if there is none (a wrong type
        is reported anyway)."""
        node = _node(self.data, (at,) if isinstance(at, str) else at)
        return node if isinstance(node, list) else []

    def names(self, at: str | Loc) -> list[tuple[int, str]]:
        """(index, name) of the items of the list at `at` that have a string name."""
        return [
            (index, item["name"])
            for index, item in enumerate(self.items(at))
            if isinstance(item, dict) and isinstance(item.get("name"), str)
        ]

    def duplicate_names(self, at: str | Loc) -> list[ConfigIssue]:
        """An issue at each item of the list at `at` whose name an earlier item already has.

        Read from the raw data, so an item that fails validation still takes part.
        """
        base: Loc = (at,) if isinstance(at, str) else at
        first: dict[str, int] = {}
        issues = []
        for index, name in self.names(base):
            if name in first:
                shown = self.show((*base, index, "name"))  # a name may come from a secret
                where = self.line((*base, first[name]))
                message = f"duplicate name {shown} (first at line {where})"
                issues.append(self.issue((*base, index, "name"), message))
            first.setdefault(name, index)
        return issues

    def validation_issues(self, exc: ValidationError) -> list[ConfigIssue]:
        """Pydantic's errors as located, short, human messages (no URLs, no secret values)."""
        issues = []
        for error in exc.errors(include_url=False):
            path = _path(self.data, error)
            issues.append(self.issue(path, _message(error, path, self)))
        return issues


def parse_yaml(text: str, file: str) -> tuple[Document, list[ConfigIssue]]:
    """Parse `text`; return the document and its duplicate-key issues.

    Raises ConfigError with one issue when the text is not YAML at all.
    """
    lines: dict[Loc, int] = {(): 1}
    issues: list[ConfigIssue] = []
    try:
        # The reader checks every character up front, so even constructing can fail.
        loader = yaml.SafeLoader(text)
    except yaml.reader.ReaderError as exc:
        line = text.count("\n", 0, max(0, exc.position)) + 1
        problem = f"unacceptable character #x{exc.character:04x}: {exc.reason}"
        raise ConfigError([ConfigIssue(file, line, "", f"invalid YAML: {problem}")]) from None
    try:
        node = loader.get_single_node()
        data = _build(loader, node, (), lines=lines, issues=issues, file=file) if node else None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        problem = getattr(exc, "problem", None) or str(exc)
        if "'\\t'" in problem:
            problem += " (YAML indents with spaces, never tabs)"
        line = mark.line + 1 if mark is not None else 0
        raise ConfigError([ConfigIssue(file, line, "", f"invalid YAML: {problem}")]) from None
    finally:
        loader.dispose()
    return Document(file, data, lines), issues


# Real configs and maps are kilobytes; parsing 16 MiB of YAML already takes minutes on a
# gateway, so anything larger is refused before it is read.
MAX_FILE_BYTES = 16 * 2**20


class UnreadableFileError(Exception):
    """The file could not be read at all; the message says why."""


def read_document(
    path: Path, file: str, environ: Mapping[str, str]
) -> tuple[Document, list[ConfigIssue]]:
    """Read and parse `path` (shown as `file`), substituting secret references.

    Returns the document and the problems that did not stop parsing (duplicate keys, missing
    secrets). Raises UnreadableFileError, or ConfigError if the text is not YAML.
    """
    try:
        text = read_bounded(path, MAX_FILE_BYTES).decode("utf-8")
    except OSError as exc:
        raise UnreadableFileError(exc.strerror or str(exc)) from None
    except UnicodeDecodeError:
        raise UnreadableFileError("not UTF-8 text") from None
    parsed, issues = parse_yaml(text, file)
    secrets = substitute(parsed.data, environ)
    doc = Document(file, secrets.data, parsed.lines, secrets.secret_paths, secrets.values)
    return doc, issues + [doc.issue(at, message) for at, message in secrets.problems]


# What a strict model says when text stands where a number or a boolean belongs.
_SCALAR_ERRORS = frozenset(
    {"int_type", "float_type", "bool_type", "literal_error", "int_parsing", "float_parsing"}
)


def type_secrets(doc: Document, validate: Callable[[Any], object]) -> None:
    """Read secret values as YAML would where the format wants a number or a boolean.

    A reference always yields text, and the models are strict (a quoted "14" is refused, as
    the schema says), yet `port: ${env:MQTT_PORT}` is a fair thing to write. So where
    validating finds text from a secret in a number's or boolean's place, that text is typed
    by YAML's own rules, in place. Written-out values are never retyped.
    """
    if not doc.secret_paths:
        return
    try:
        validate(doc.data)
    except ValidationError as exc:
        for error in exc.errors(include_url=False):
            path = _path(doc.data, error)
            if error["type"] not in _SCALAR_ERRORS or path not in doc.secret_paths or not path:
                continue
            parent = _node(doc.data, path[:-1])
            text = parent[path[-1]]
            try:
                typed = yaml.safe_load(text) if isinstance(text, str) and len(text) < 64 else None
            except yaml.YAMLError:
                continue
            if isinstance(typed, int | float):  # bool is an int too
                parent[path[-1]] = typed


# Aliases may repeat a node many times over (`[*a, *a, ...]` nested: "billion laughs") or
# contain themselves (`&a [*a]`). A config never needs more values than this.
MAX_VALUES = 1_000_000


def _build(
    loader: yaml.SafeLoader,
    node: yaml.Node,
    at: Loc,
    *,
    lines: dict[Loc, int],
    issues: list[ConfigIssue],
    file: str,
    inside: tuple[int, ...] = (),
    built: list[int] | None = None,
) -> Any:
    built = [0] if built is None else built
    built[0] += 1
    line = node.start_mark.line + 1
    if id(node) in inside:
        message = "invalid YAML: an alias refers to a node that contains it"
        raise ConfigError([ConfigIssue(file, line, render_path(at), message)])
    if built[0] > MAX_VALUES:
        message = f"invalid YAML: more than {MAX_VALUES} values (aliases repeated too often?)"
        raise ConfigError([ConfigIssue(file, line, render_path(at), message)])
    inner = (*inside, id(node))
    if isinstance(node, yaml.MappingNode):
        loader.flatten_mapping(node)  # resolves `<<: *anchor` merge keys like safe_load does
        result: dict[Any, Any] = {}
        for key_node, value_node in node.value:
            line = key_node.start_mark.line + 1
            if not isinstance(key_node, yaml.ScalarNode):
                issues.append(ConfigIssue(file, line, render_path(at), "a key must be a scalar"))
                continue
            key: Any = loader.construct_object(key_node, deep=True)
            path: Loc = (*at, key)
            if key in result:
                message = f"duplicate key {key!r} (first at line {lines[path]})"
                issues.append(ConfigIssue(file, line, render_path(path), message))
                continue
            lines[path] = line
            result[key] = _build(loader, value_node, path, lines=lines, issues=issues,
                                 file=file, inside=inner, built=built)
        return result
    if isinstance(node, yaml.SequenceNode):
        items = []
        for index, item in enumerate(node.value):
            lines[(*at, index)] = item.start_mark.line + 1
            items.append(_build(loader, item, (*at, index), lines=lines, issues=issues,
                                file=file, inside=inner, built=built))
        return items
    return loader.construct_object(node, deep=True)


def _node(data: Any, path: Loc) -> Any:
    """What `path` leads to in the parsed YAML `data`, or None where it leads nowhere."""
    for part in path:
        try:
            data = data[part]
        except (KeyError, IndexError, TypeError):
            return None
    return data


def _path(data: Any, error: ErrorDetails) -> Loc:
    """The error's location as a path into the YAML data.

    Pydantic's `loc` also holds steps that are not in the file, such as the union tag of a
    link (`links.0.tcp.port`); those are dropped. A final step not in the data is kept: it
    names a missing key.
    """
    path: list[str | int] = []
    node = data
    loc = error["loc"]
    for step, part in enumerate(loc):
        in_dict = isinstance(node, dict) and part in node
        if in_dict or (isinstance(node, list) and isinstance(part, int) and 0 <= part < len(node)):
            node = node[part]
        elif not (isinstance(node, dict) and step == len(loc) - 1):
            continue
        path.append(part)
    if error["type"] in ("union_tag_invalid", "union_tag_not_found"):
        path.append("type")  # the one discriminated union here is a link's `type`
    return tuple(path)


def _message(error: ErrorDetails, path: Loc, doc: Document) -> str:
    kind, ctx = error["type"], error.get("ctx", {})
    if kind == "extra_forbidden":
        return f"unknown key {path[-1]!r}"
    if kind in ("missing", "union_tag_not_found"):
        return "required key missing"
    if kind == "literal_error":
        return f"{doc.show(path, error['input'])} is not one of {ctx['expected']}"
    if kind == "union_tag_invalid":
        return f"{doc.show(path, ctx['tag'])} is not one of {ctx['expected_tags']}"
    if kind == "string_pattern_mismatch":
        return f"{doc.show(path, error['input'])} may only contain [A-Za-z0-9_-]"
    if kind == "value_error":
        return error["msg"].removeprefix("Value error, ")
    if kind == "model_type" and not path:
        return "expected a mapping of keys"
    if kind in _WANTED and isinstance(error["input"], str):
        if doc.is_secret(path):
            return f"expected {_WANTED[kind]}; the secret's value is not one"
        shown = doc.show(path, error["input"])
        return f"expected {_WANTED[kind]}, not the text {shown}: drop the quotes"
    if kind == "string_type" and isinstance(error["input"], bool):
        # YAML 1.1 reads unquoted yes/no/on/off/true/false as booleans.
        example = "'on'" if error["input"] else "'off'"
        return (
            f"YAML read an unquoted on/off/yes/no here as {str(error['input']).lower()}: "
            f"quote the word, e.g. {example}"
        )
    return error["msg"]


_WANTED = {"int_type": "an integer", "float_type": "a number", "bool_type": "true or false"}
