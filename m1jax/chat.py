"""Chat prompts and model-output parsing for MiniMax-M1 (spec §8).

* `apply_chat_template` renders a checkpoint's own Jinja `chat_template` in a sandbox set up the way transformers
  sets it up (`trim_blocks`, `lstrip_blocks`, loop controls, a non-HTML-escaping `tojson`, `raise_exception`,
  `strftime_now`, a `{% generation %}` tag), so the text equals transformers'
  `apply_chat_template(..., tokenize=False)` for the same template and messages.
* `normalize_messages` turns OpenAI-style messages into the form M1's template needs (content as a list of
  `{"type": "text", "text": ...}` items).
* `parse_output` splits generated text into `<think>` reasoning, content and `<tool_calls>` JSON lines.
"""

from __future__ import annotations

import dataclasses
import datetime
import functools
import json
from collections.abc import Mapping, Sequence
from typing import Any

import jinja2
import jinja2.ext
import jinja2.nodes
import jinja2.sandbox
import jinja2.utils
import numpy as np

THINK_OPEN, THINK_CLOSE = "<think>", "</think>"
TOOL_CALLS_OPEN, TOOL_CALLS_CLOSE = "<tool_calls>", "</tool_calls>"
_REASONING_KEYS = ("reasoning_content", "thinking", "reasoning")


# ---- the Jinja environment ------------------------------------------------------------------------------------


class _GenerationTag(jinja2.ext.Extension):
    """`{% generation %}…{% endgeneration %}` (marks assistant text for transformers' masks): renders its body."""

    tags = {"generation"}

    def parse(self, parser):
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return jinja2.nodes.CallBlock(self.call_method("_render"), [], [], body).set_lineno(lineno)

    def _render(self, caller):
        return caller()


class _Namespace(jinja2.utils.Namespace):
    """`namespace(...)` that refuses underscore attributes (no path to interpreter internals)."""

    def __init__(*args, **kwargs):
        self, args = args[0], args[1:]
        attrs = dict(*args, **kwargs)
        for name in attrs:
            _Namespace._check(name)
        jinja2.utils.Namespace.__init__(self, attrs)

    def __setitem__(self, name, value):
        _Namespace._check(name)
        jinja2.utils.Namespace.__setitem__(self, name, value)

    @staticmethod
    def _check(name):
        if isinstance(name, str) and name.startswith("_"):
            raise jinja2.exceptions.SecurityError(f"chat templates cannot set underscore attributes ({name!r})")


class _DictFactory:
    """`dict(...)` / `dict.fromkeys(...)` for templates, without exposing the `dict` type itself."""

    def __call__(self, *args, **kwargs):
        return dict(*args, **kwargs)

    def fromkeys(self, *args, **kwargs):
        return dict.fromkeys(*args, **kwargs)


def _tojson(value, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
    """`json.dumps` without HTML escaping (Jinja's own `tojson` escapes `<`, `>`, `&`, `'`)."""
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _raise_exception(message):
    raise jinja2.exceptions.TemplateError(message)


def _strftime_now(fmt):
    return datetime.datetime.now().strftime(fmt)


@functools.lru_cache(maxsize=16)
def compile_chat_template(chat_template: str) -> jinja2.Template:
    """The compiled template, in a sandboxed environment configured like transformers' chat templates."""
    env = jinja2.sandbox.ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[_GenerationTag, jinja2.ext.loopcontrols]
    )
    env.filters["tojson"] = _tojson
    env.globals.update(
        raise_exception=_raise_exception, strftime_now=_strftime_now, dict=_DictFactory(), namespace=_Namespace
    )
    try:
        return env.from_string(chat_template)
    except jinja2.exceptions.TemplateSyntaxError as err:
        raise ValueError(f"chat_template is not valid Jinja (line {err.lineno}): {err.message}") from None


# ---- messages -----------------------------------------------------------------------------------------------------


def _plain(value: Any, where: str) -> Any:
    """A copy of `value` made of plain JSON-like types only (what the sandboxed template may see)."""
    if value is None or type(value) in (str, int, float, bool):
        return value
    for base in (bool, str, int, float):  # subclasses (enums, ...) lose their extra methods
        if isinstance(value, base):
            return base(value)
    if isinstance(value, np.generic):
        return _plain(value.item(), where)
    if isinstance(value, Mapping):
        return {_plain(k, where): _plain(v, f"{where}[{k!r}]") for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        items = [_plain(v, f"{where}[{i}]") for i, v in enumerate(value)]
        return items if isinstance(value, list) else tuple(items)
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return _plain({f.name: getattr(value, f.name) for f in dataclasses.fields(value)}, where)
    raise TypeError(f"{where}: a {type(value).__name__} cannot be passed to a chat template (use JSON-like data)")


def _template_messages(messages: Sequence[Mapping[str, Any]]) -> list[dict]:
    """Messages as transformers hands them to a template: plain copies, keys whose value is None dropped, and the
    reasoning (under `reasoning_content`, `thinking` or `reasoning`) also given as `reasoning_content` and
    `thinking`."""
    if isinstance(messages, (str, Mapping)) or not isinstance(messages, Sequence):
        raise TypeError(f"messages must be a list of dicts, got {type(messages).__name__}")
    out = []
    for i, message in enumerate(messages):
        if not isinstance(message, Mapping):
            raise TypeError(f"message {i} must be a dict with 'role' and 'content', got {type(message).__name__}")
        message = {k: v for k, v in _plain(message, f"message {i}").items() if v is not None}
        reasoning = next((message[k] for k in _REASONING_KEYS if k in message), None)
        if reasoning is not None:
            message = {"thinking": reasoning, **message, "reasoning_content": reasoning}
        out.append(message)
    return out


def format_tool_calls(tool_calls: Sequence[Mapping[str, Any]]) -> str:
    """M1's tool-call text: `<tool_calls>\\n{"name": ..., "arguments": {...}}\\n…</tool_calls>`, one JSON per line.

    Accepts `{"name", "arguments"}` items and OpenAI items `{"type": "function", "function": {"name",
    "arguments"}}`; arguments may be a dict or a JSON string of one.
    """
    lines = []
    for i, call in enumerate(tool_calls):
        function = call.get("function", call) if isinstance(call, Mapping) else None
        if not isinstance(function, Mapping) or not isinstance(function.get("name"), str):
            raise ValueError(f"tool call {i} needs a 'name' (or 'function': {{'name': ...}}), got {call!r}")
        arguments = function.get("arguments", {})
        if isinstance(arguments, str):
            try:
                arguments = json.loads(arguments)
            except json.JSONDecodeError as err:
                raise ValueError(f"tool call {i} ({function['name']}): arguments are not valid JSON: {err}") from None
        lines.append(json.dumps({"name": function["name"], "arguments": arguments}, ensure_ascii=False))
    return TOOL_CALLS_OPEN + "\n" + "".join(line + "\n" for line in lines) + TOOL_CALLS_CLOSE


def _tool_call_names(messages: Sequence[Mapping[str, Any]]) -> dict[str, str]:
    """`tool_call_id -> function name` over the assistant tool calls of `messages`."""
    names = {}
    for message in messages:
        calls = message.get("tool_calls")
        for call in calls if isinstance(calls, (list, tuple)) else ():
            function = call.get("function", call) if isinstance(call, Mapping) else None
            if isinstance(function, Mapping) and isinstance(function.get("name"), str):
                if isinstance(call.get("id"), str):
                    names[call["id"]] = function["name"]
    return names


def normalize_messages(messages: Sequence[Mapping[str, Any]]) -> list[dict]:
    """Copies of `messages` in the form M1's chat template reads. Idempotent.

    * string content -> `[{"type": "text", "text": content}]`; string items of a content list -> text items;
      missing / None content -> `[]`.
    * role `tool`: every item also gets `"name"` (the tool's name), from the message's `name` or, for OpenAI
      messages, from the earlier assistant tool call whose `id` equals its `tool_call_id`.
    * an assistant message's `tool_calls` (which M1's template does not render) become a final text item in M1's
      output format (`format_tool_calls`), on a new line after any text; the `tool_calls` key is dropped.
    Everything else (extra keys, non-text items) is kept; keys whose value is None are dropped and reasoning is
    aliased as transformers does before rendering (see `_template_messages`). Note M1's template reads only the
    first content item of system and user messages.
    """
    call_names = _tool_call_names([m for m in messages if isinstance(m, Mapping)])
    out = []
    for i, message in enumerate(_template_messages(messages)):
        role = message.get("role")
        if not isinstance(role, str):
            raise ValueError(f"message {i} has no 'role' string: {message!r}")
        content = message.pop("content", [])
        if isinstance(content, str):
            content = [content]
        if not isinstance(content, list):
            raise TypeError(f"message {i} ({role}): content must be a string or a list, got {type(content).__name__}")
        if not all(isinstance(c, (str, Mapping)) for c in content):
            raise TypeError(f"message {i} ({role}): content items must be strings or dicts, got {content!r}")
        items = [{"type": "text", "text": c} if isinstance(c, str) else dict(c) for c in content]
        if role == "tool":
            name = message.get("name") or call_names.get(message.get("tool_call_id"))
            for item in items:
                if "name" not in item:
                    if not isinstance(name, str):
                        raise ValueError(
                            f"message {i} (role 'tool') needs the tool's name: give it a 'name' key, or a "
                            "'tool_call_id' matching an earlier assistant tool call"
                        )
                    item["name"] = name
        tool_calls = message.pop("tool_calls", None)
        if role == "assistant" and tool_calls:
            text = "".join(c.get("text", "") for c in items if c.get("type") == "text")
            sep = "\n" if text and not text.endswith("\n") else ""
            items.append({"type": "text", "text": sep + format_tool_calls(tool_calls)})
        elif tool_calls:
            message["tool_calls"] = tool_calls
        out.append({**message, "content": items})
    return out


def apply_chat_template(
    messages: Sequence[Mapping[str, Any]],
    *,
    chat_template: str,
    tools: Sequence[Mapping[str, Any]] | None = None,
    add_generation_prompt: bool = True,
    documents: Sequence[Mapping[str, Any]] | None = None,
    normalize: bool = True,
    **extra: Any,
) -> str:
    """The prompt text `chat_template` renders for `messages` (and `tools`, `documents`, `extra` variables).

    With `normalize=True` (default) the messages go through `normalize_messages` first, which M1's template needs;
    pass `normalize=False` to render them exactly as given, as transformers does. Tools are passed as given (M1
    expects plain function schemas `{"name", "description", "parameters"}`).
    """
    if not isinstance(chat_template, str):
        raise TypeError(f"chat_template must be a string, got {type(chat_template).__name__}")
    template = compile_chat_template(chat_template)
    messages = normalize_messages(messages) if normalize else _template_messages(messages)
    if tools is not None and (isinstance(tools, (str, Mapping)) or not isinstance(tools, Sequence)):
        raise TypeError(f"tools must be a list of JSON schema dicts, got {type(tools).__name__}")
    if tools is not None and not all(isinstance(t, Mapping) for t in tools):
        raise TypeError("tools must be a list of JSON schema dicts")
    try:
        return template.render(
            messages=messages,
            tools=_plain(tools, "tools"),
            documents=_plain(documents, "documents"),
            add_generation_prompt=add_generation_prompt,
            **_plain(extra, "template variables"),
        )
    except jinja2.exceptions.UndefinedError as err:
        hint = "" if normalize else " (M1's template needs normalize=True)"
        raise ValueError(f"the chat template reads data the messages lack: {err.message}{hint}") from None


# ---- parsing model output ------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class ParsedOutput:
    """Generated text split into reasoning (None without a think block), content and tool calls.

    `tool_calls` holds `{"name": str, "arguments": dict}`; `errors` describes every tool-call line that could not
    be used (and an unterminated `<tool_calls>` block).
    """

    reasoning: str | None
    content: str
    tool_calls: list[dict] = dataclasses.field(default_factory=list)
    errors: list[str] = dataclasses.field(default_factory=list)


def split_reasoning(text: str) -> tuple[str | None, str]:
    """(reasoning, rest) of `text`: the stripped inside of `<think>…</think>` and the text around it.

    An unterminated `<think>` (generation stopped while thinking) makes the whole tail reasoning; a `</think>`
    without an opening tag (a template that opened it) makes everything before it reasoning.
    """
    start, end = text.find(THINK_OPEN), text.find(THINK_CLOSE)
    if end != -1 and (start == -1 or end < start):
        return text[:end].strip(), text[end + len(THINK_CLOSE) :]
    if start == -1:
        return None, text
    end = text.find(THINK_CLOSE, start)
    if end == -1:
        return text[start + len(THINK_OPEN) :].strip(), text[:start]
    return text[start + len(THINK_OPEN) : end].strip(), text[:start] + text[end + len(THINK_CLOSE) :]


def _tool_call(obj: Any) -> dict:
    """`{"name", "arguments"}` of one decoded JSON object; ValueError saying what is wrong with it."""
    if not isinstance(obj, dict):
        raise ValueError(f"expected a JSON object, got {type(obj).__name__}")
    name, arguments = obj.get("name"), obj.get("arguments", {})
    if not isinstance(name, str) or not name:
        raise ValueError("missing 'name' string")
    if isinstance(arguments, str):
        try:
            arguments = json.loads(arguments)
        except json.JSONDecodeError as err:
            raise ValueError(f"'arguments' string is not JSON ({err.msg})") from None
    if not isinstance(arguments, dict):
        raise ValueError(f"'arguments' must be a JSON object, got {type(arguments).__name__}")
    return {"name": name, "arguments": arguments}


def parse_tool_calls(body: str) -> tuple[list[dict], list[str]]:
    """(calls, errors) of the inside of a `<tool_calls>` block: a sequence of JSON objects, normally one per line.

    Whitespace and objects spread over several lines are tolerated. Text that is not valid JSON is reported
    (`"line N: ..."`, counting the `<tool_calls>` line as line 1) and skipped up to the next line that starts
    with `{` or `[`.
    """
    decoder = json.JSONDecoder()
    calls, errors = [], []
    pos = 0
    while True:
        while pos < len(body) and body[pos].isspace():
            pos += 1
        if pos >= len(body):
            return calls, errors
        line_no = body.count("\n", 0, pos) + 1
        try:
            obj, end = decoder.raw_decode(body, pos)
        except json.JSONDecodeError as err:
            skip = pos
            while True:  # the bad text ends where a line starting with "{" or "[" begins
                skip = body.find("\n", skip)
                if skip == -1 or body[skip:].lstrip()[:1] in ("{", "["):
                    break
                skip += 1
            skip = len(body) if skip == -1 else skip
            errors.append(f"line {line_no}: invalid JSON ({err.msg}): {body[pos:skip].strip()[:200]!r}")
            pos = skip
            continue
        try:
            calls.append(_tool_call(obj))
        except ValueError as err:
            errors.append(f"line {line_no}: {err}: {body[pos:end][:200]!r}")
        pos = end


def parse_output(text: str) -> ParsedOutput:
    """Splits generated M1 text into reasoning, content and tool calls; never raises on malformed output.

    `<think>…</think>` gives the reasoning (see `split_reasoning`); every `<tool_calls>…</tool_calls>` block of the
    rest gives tool calls (see `parse_tool_calls`) and is cut out of the content. Reasoning and content are
    stripped of surrounding whitespace.
    """
    if not isinstance(text, str):
        raise TypeError(f"parse_output expects a str, got {type(text).__name__}")
    reasoning, rest = split_reasoning(text)
    pieces, calls, errors = [], [], []
    pos = 0
    while (start := rest.find(TOOL_CALLS_OPEN, pos)) != -1:
        pieces.append(rest[pos:start])
        body_start = start + len(TOOL_CALLS_OPEN)
        end = rest.find(TOOL_CALLS_CLOSE, body_start)
        if end == -1:
            errors.append(f"unterminated {TOOL_CALLS_OPEN} block (no {TOOL_CALLS_CLOSE})")
            end = len(rest)
        block_calls, block_errors = parse_tool_calls(rest[body_start:end])
        calls += block_calls
        errors += block_errors
        pos = min(end + len(TOOL_CALLS_CLOSE), len(rest))
    pieces.append(rest[pos:])
    return ParsedOutput(reasoning=reasoning, content="".join(pieces).strip(), tool_calls=calls, errors=errors)


__all__ = [
    "ParsedOutput",
    "apply_chat_template",
    "compile_chat_template",
    "format_tool_calls",
    "normalize_messages",
    "parse_output",
    "parse_tool_calls",
    "split_reasoning",
]
