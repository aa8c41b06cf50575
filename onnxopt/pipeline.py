"""Textual pipelines: ``prune(sparsity=0.5),zero-rows,quantize(method=mse),dce``.

A step names a pass, or a preset of the registry (``cleanup``) that stands for its steps.

Steps are joined by commas; options are ``key=value`` typed from the pass's ``Options`` dataclass
(bool, int, float, str, ``X | None`` with ``none``, and ``tuple[str, ...]`` written ``a|b``).
:func:`format_pipeline` prints every option, defaults included, and parses back to the same steps.
"""

from __future__ import annotations

import dataclasses
import difflib
import re
import types
import typing
from dataclasses import dataclass
from typing import Any

from .errors import InputError
from .passes.base import Pass


class PipelineError(InputError):
    """A pipeline that does not parse: the message shows the text and a caret under the column."""

    def __init__(self, text: str, column: int, problem: str) -> None:
        super().__init__(f"pipeline column {column + 1}: {problem}\n  {text}\n  {' ' * column}^")
        self.column = column


@dataclass(frozen=True)
class Step:
    name: str
    options: Any

    @property
    def pass_type(self) -> type[Pass]:
        from .registry import PASSES

        return PASSES[self.name]

    def __str__(self) -> str:
        return format_step(self)


_TOKEN = re.compile(r'\s*(?:(?P<punct>[(),=])|(?P<quoted>"[^"]*")|(?P<word>[^\s(),="]+))')


def _tokens(text: str) -> list[tuple[str, str, int]]:
    tokens, pos = [], 0
    while pos < len(text):
        if text[pos:].strip() == "":
            break
        match = _TOKEN.match(text, pos)
        if not match or match.end() == pos:
            raise PipelineError(text, pos, f"unexpected character {text[pos]!r}")
        kind = match.lastgroup
        start = match.start(kind)
        tokens.append((kind, match.group(kind), start))
        pos = match.end()
    return tokens


def parse_pipeline(text: str) -> list[Step]:
    """Steps of a pipeline; a preset name (``cleanup``) stands for its steps."""
    from .registry import PASSES, PRESETS

    tokens = _tokens(text)
    if not tokens:
        raise PipelineError(text, 0, "the pipeline is empty: name at least one pass (see `onnxopt passes`)")
    steps: list[Step] = []
    i = 0

    def expect(kinds: tuple[str, ...], what: str) -> tuple[str, str, int]:
        nonlocal i
        if i >= len(tokens):
            raise PipelineError(text, len(text), f"expected {what} at the end")
        token = tokens[i]
        if token[0] not in kinds and not (token[0] == "punct" and token[1] in kinds):
            raise PipelineError(text, token[2], f"expected {what}, found {token[1]!r}")
        i += 1
        return token

    while True:
        _, name, col = expect(("word",), "a pass name")
        if name in PRESETS:
            if i < len(tokens) and tokens[i][1] == "(":
                raise PipelineError(text, tokens[i][2], f"preset '{name}' takes no options: "
                                                        f"write its steps ({PRESETS[name]}) to set some")
            steps.extend(parse_pipeline(PRESETS[name]))
            if i >= len(tokens):
                return steps
            expect((",",), "',' between steps")
            continue
        if name not in PASSES:
            raise PipelineError(text, col, f"unknown pass '{name}'{_suggest(name, [*PASSES, *PRESETS])}")
        options_type = PASSES[name].Options
        fields = {f.name: f for f in dataclasses.fields(options_type)}
        hints = typing.get_type_hints(options_type)
        given: dict[str, Any] = {}
        if i < len(tokens) and tokens[i][1] == "(":
            i += 1
            while True:
                _, key, kcol = expect(("word",), "an option name")
                key_attr = key.replace("-", "_")
                if key_attr not in fields:
                    choices = {f.replace("_", "-"): f for f in fields} | dict.fromkeys(fields)
                    known = ", ".join(fields) or "none"
                    raise PipelineError(text, kcol, f"pass '{name}' has no option '{key}'"
                                        f"{_suggest(key, choices)} (options: {known})")
                if key_attr in given:
                    raise PipelineError(text, kcol, f"option '{key}' given twice")
                expect(("=",), "'='")
                kind, raw, vcol = expect(("word", "quoted"), f"a value for '{key}'")
                raw = raw[1:-1] if kind == "quoted" else raw
                try:
                    given[key_attr] = convert_value(raw, hints[key_attr])
                except ValueError as exc:
                    raise PipelineError(text, vcol, f"option '{key}' of '{name}': {exc}") from None
                _, sep, _ = expect((",", ")"), "',' or ')'")
                if sep == ")":
                    break
        try:
            options = options_type(**given)
        except InputError as exc:
            message = str(exc)
            raise PipelineError(text, col, message if message.startswith(f"{name}:") else f"{name}: {message}") from None
        steps.append(Step(name, options))
        if i >= len(tokens):
            return steps
        expect((",",), "',' between steps")


def _suggest(word: str, choices) -> str:
    close = difflib.get_close_matches(word, list(choices), n=1)
    return f" (did you mean '{close[0]}'?)" if close else ""


def convert_value(raw: str, annotation: Any) -> Any:
    """Type a pipeline value from an Options field annotation."""
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(annotation) if a is not type(None)]
        if raw.lower() == "none":
            return None
        return convert_value(raw, args[0])
    if origin is tuple:
        item_type = typing.get_args(annotation)[0]
        return tuple(convert_value(part, item_type) for part in raw.split("|") if part != "")
    if annotation is bool:
        lowered = raw.lower()
        if lowered in ("true", "1", "yes", "on"):
            return True
        if lowered in ("false", "0", "no", "off"):
            return False
        raise ValueError(f"expected true or false, got '{raw}'")
    if annotation is int:
        try:
            return int(raw)
        except ValueError:
            raise ValueError(f"expected a whole number, got '{raw}'") from None
    if annotation is float:
        try:
            return float(raw)
        except ValueError:
            raise ValueError(f"expected a number, got '{raw}'") from None
    return raw


def _format_value(value: Any) -> str:
    if value is None:
        return "none"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, tuple):
        text = "|".join(_format_value(v) for v in value)
    else:
        text = repr(value) if isinstance(value, float) else str(value)
    special = r'[\s(),="]' if isinstance(value, tuple) else r'[\s(),="|]'
    return f'"{text}"' if text == "" or re.search(special, text) else text


def format_step(step: Step) -> str:
    fields = dataclasses.fields(step.options)
    if not fields:
        return step.name
    args = ",".join(f"{f.name}={_format_value(getattr(step.options, f.name))}" for f in fields)
    return f"{step.name}({args})"


def format_pipeline(steps: list[Step]) -> str:
    return ",".join(format_step(s) for s in steps)


def describe_options(options_type: type) -> list[tuple[str, str, str]]:
    """(name, type, default) for each option, as `onnxopt passes` and the README show them."""
    hints = typing.get_type_hints(options_type)
    rows = []
    for f in dataclasses.fields(options_type):
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()  # type: ignore[misc]
        rows.append((f.name, _type_name(hints[f.name]), _format_value(default)))
    return rows


def _type_name(annotation: Any) -> str:
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        return " | ".join(_type_name(a) for a in typing.get_args(annotation))
    if origin is tuple:
        return f"list of {_type_name(typing.get_args(annotation)[0])} (a|b)"
    if annotation is type(None):
        return "None"
    return getattr(annotation, "__name__", str(annotation))
