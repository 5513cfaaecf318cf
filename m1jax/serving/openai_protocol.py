"""The request and response formats of `m1jax serve` and `m1jax batch`: OpenAI chat/completions and the seed's
`POST /v1/minimax-m1/generate`.

* Request bodies are pydantic models validated strictly from the raw JSON bytes (`parse_body`): a wrong type,
  a missing field, a non-finite or out-of-range number, bad UTF-8 or an unsupported option becomes an `ApiError`
  (HTTP 400, OpenAI's error shape) whose `param` names the offending field (`messages.0.content`).
* `build_request` turns a validated body into a scheduler `Request` (chat messages rendered with the tokenizer's
  chat template; a text longer than `ENCODE_BLOCK_CHARS` tokenized block-wise by `streaming.encode_text`, to the
  ids of the whole-text encoding; `max_tokens` checked against the context window).
* `chat_completion_body`, `completion_body`, `generate_body` and `usage_body` turn a finished `RequestOutput`
  into response JSON; `ChatStream` and `CompletionStream` turn a request's `Delta`s into streaming chunks.
"""

from __future__ import annotations

import dataclasses
import json
import math
import secrets
from collections.abc import Mapping
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from m1jax import chat
from m1jax.sampling import SamplingParams
from m1jax.serving.output_parser import OutputStreamParser
from m1jax.serving.scheduler import Request
from m1jax.streaming import BLOCK_CHARS, encode_text

INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1
MAX_TOP_LOGPROBS = 20
ENCODE_BLOCK_CHARS = BLOCK_CHARS  # prompts longer than this are tokenized block-wise (`streaming.encode_text`)
CHAT_URL, COMPLETIONS_URL, GENERATE_URL = "/v1/chat/completions", "/v1/completions", "/v1/minimax-m1/generate"

# The finish reasons of `RequestOutput` as the OpenAI API spells them (the seed endpoint reports them unchanged).
OPENAI_FINISH_REASON = {"stop": "stop", "stop_string": "stop", "length": "length", "repetition": "stop",
                        "cancelled": "stop"}


class ApiError(Exception):
    """A request the server refuses: HTTP `status`, a message, the offending field (`param`) and an error type."""

    def __init__(self, message: str, *, param: str | None = None, status: int = 400,
                 type: str = "invalid_request_error"):
        super().__init__(message)
        self.message, self.param, self.status, self.type = message, param, status, type

    def body(self) -> dict:
        """OpenAI's error JSON: `{"error": {"message", "type", "param", "code"}}`."""
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": None}}


# ---- request schemas ------------------------------------------------------------------------------------------


class _Strict(BaseModel):
    """Strict JSON types (no "1" for 1, no true for 1, no 1.5 for an integer); unknown fields are ignored."""

    model_config = ConfigDict(strict=True, extra="ignore")


class TextPart(_Strict):
    type: Literal["text"]
    text: str


class FunctionCall(_Strict):
    name: str
    arguments: str | dict = "{}"


class ToolCall(_Strict):
    id: str | None = None
    type: Literal["function"] = "function"
    function: FunctionCall


class ChatMessage(_Strict):
    """One message; `reasoning_content` and `reasoning` are the same thing (both accepted)."""

    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[TextPart] | None = None
    name: str | None = None
    tool_calls: list[ToolCall] | None = None
    tool_call_id: str | None = None
    reasoning_content: str | None = None
    reasoning: str | None = None

    @model_validator(mode="after")
    def _content_present(self):
        if self.content is None and self.role != "assistant":
            raise _FieldError("content", f"a {self.role} message needs 'content'")
        if self.content is None and not self.tool_calls:
            raise _FieldError("content", "an assistant message needs 'content' or 'tool_calls'")
        return self


class FunctionDef(_Strict):
    name: str = Field(min_length=1)
    description: str | None = None
    parameters: dict | None = None
    strict: bool | None = None


class Tool(_Strict):
    type: Literal["function"]
    function: FunctionDef


class StreamOptions(_Strict):
    include_usage: bool = False


class _Sampling(_Strict):
    """Sampling and the M1 knobs shared by every endpoint. `top_k`, `min_p`, `thinking_budget`,
    `expert_threshold` and `return_routed_experts` are extensions (OpenAI clients pass them in `extra_body`)."""

    temperature: float | None = Field(None, ge=0, allow_inf_nan=False)
    top_p: float | None = Field(None, gt=0, le=1, allow_inf_nan=False)
    top_k: int | None = Field(None, ge=0, le=2**31 - 1)
    min_p: float | None = Field(None, ge=0, le=1, allow_inf_nan=False)
    seed: int | None = Field(None, ge=INT64_MIN, le=INT64_MAX)
    stop: str | list[str] | None = None
    thinking_budget: int | None = Field(None, ge=0, le=2**31 - 1)
    expert_threshold: float = Field(1.0, gt=0, le=1, allow_inf_nan=False)
    return_routed_experts: bool = False
    n: int = 1
    presence_penalty: float = Field(0.0, allow_inf_nan=False)
    frequency_penalty: float = Field(0.0, allow_inf_nan=False)
    logit_bias: dict | None = None
    user: str | None = None

    @model_validator(mode="after")
    def _supported(self):
        for name in ("presence_penalty", "frequency_penalty"):
            if getattr(self, name) != 0:
                raise _FieldError(name, f"{name} is not supported (only 0)")
        if self.n != 1:
            raise _FieldError("n", "only n=1 is supported (send one request per completion)")
        if self.logit_bias:
            raise _FieldError("logit_bias", "logit_bias is not supported")
        stops = [self.stop] if isinstance(self.stop, str) else (self.stop or [])
        if len(stops) > 16 or any(not s for s in stops):
            raise _FieldError("stop", "stop must be up to 16 non-empty strings")
        return self


class ChatCompletionRequest(_Sampling):
    model: str | None = None
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = Field(None, ge=1, le=2**31 - 1)
    max_completion_tokens: int | None = Field(None, ge=1, le=2**31 - 1)
    stream: bool = False
    stream_options: StreamOptions | None = None
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=MAX_TOP_LOGPROBS)
    tools: list[Tool] | None = None
    tool_choice: Literal["auto", "none"] | None = None
    parallel_tool_calls: bool | None = None
    response_format: dict | None = None

    @model_validator(mode="after")
    def _chat_options(self):
        if self.top_logprobs and not self.logprobs:
            raise _FieldError("top_logprobs", "top_logprobs needs logprobs: true")
        if self.response_format not in (None, {"type": "text"}):
            raise _FieldError("response_format", "only response_format {\"type\": \"text\"} is supported")
        return self


class CompletionRequest(_Sampling):
    model: str | None = None
    prompt: str | list[int] | list[str] | list[list[int]]
    max_tokens: int | None = Field(None, ge=1, le=2**31 - 1)
    stream: bool = False
    stream_options: StreamOptions | None = None
    logprobs: int | None = Field(None, ge=0, le=MAX_TOP_LOGPROBS)
    echo: bool = False
    suffix: str | None = None
    best_of: int | None = None

    @model_validator(mode="after")
    def _completion_options(self):
        if self.echo:
            raise _FieldError("echo", "echo is not supported")
        if self.suffix:
            raise _FieldError("suffix", "suffix is not supported")
        if self.best_of not in (None, 1):
            raise _FieldError("best_of", "only best_of=1 is supported")
        if isinstance(self.prompt, list) and self.prompt and isinstance(self.prompt[0], (str, list)):
            if len(self.prompt) != 1:
                raise _FieldError("prompt", "one prompt per request (send one request per prompt)")
        if self.prompt in ("", [], [[]], [""]):
            raise _FieldError("prompt", "prompt is empty")
        return self


class GenerateRequest(_Sampling):
    """The seed's `POST /v1/minimax-m1/generate`: `input` is a text or chat messages."""

    input: str | list[ChatMessage]
    max_output_tokens: int | None = Field(None, ge=1, le=2**31 - 1)
    context_window: int | None = Field(None, ge=1, le=2**31 - 1)
    tools: list[Tool] | None = None
    top_logprobs: int = Field(0, ge=0, le=MAX_TOP_LOGPROBS)

    @model_validator(mode="after")
    def _generate_options(self):
        if self.input in ("", []):
            raise _FieldError("input", "input is empty")
        if self.tools and isinstance(self.input, str):
            raise _FieldError("tools", "tools need chat messages as input")
        return self


class _FieldError(ValueError):
    """A validator's error about one named field (reported as that field, not as the whole body)."""

    def __init__(self, field: str, message: str):
        super().__init__(message)
        self.field = field


SCHEMAS = {CHAT_URL: ChatCompletionRequest, COMPLETIONS_URL: CompletionRequest, GENERATE_URL: GenerateRequest}


def _param(loc: tuple, data: Any, missing: bool) -> str | None:
    """The dotted path of a pydantic error location in the input (`messages.0.content`), skipping the
    union-member tags pydantic adds (`str`, `list[int]`, `ChatMessage`)."""
    parts = []
    for i, item in enumerate(loc):
        if isinstance(data, Mapping) and isinstance(item, str) and item in data:
            data = data[item]
        elif isinstance(data, list) and isinstance(item, int) and 0 <= item < len(data):
            data = data[item]
        elif isinstance(item, str) and ("[" in item or item[:1].isupper() or item in _TYPE_TAGS):
            continue
        elif missing and i == len(loc) - 1 and isinstance(item, str):
            pass  # the missing field itself
        else:
            break
        parts.append(str(item))
    return ".".join(parts) or None


_TYPE_TAGS = ("str", "int", "float", "bool", "list", "dict", "none")


def parse_body(schema: type[BaseModel], raw: bytes | str) -> BaseModel:
    """`raw` JSON validated as `schema`; ApiError (400) naming the field on any problem."""
    if isinstance(raw, bytes):
        try:
            raw.decode("utf-8")
        except UnicodeDecodeError as e:
            raise ApiError(f"the request body is not valid UTF-8 (byte {e.start})") from None
    try:
        return schema.model_validate_json(raw)
    except ValidationError as e:
        try:
            data = json.loads(raw)
        except (ValueError, RecursionError):
            data = None
        err = e.errors(include_url=False)[0]
        if err["type"] == "json_invalid":
            raise ApiError(f"the request body is not valid JSON: {err['msg'].removeprefix('Invalid JSON: ')}") \
                from None
        if err["type"] in ("model_type", "model_attributes_type") and not err["loc"]:
            raise ApiError("the request body must be a JSON object") from None
        param = _param(err["loc"], data, err["type"] == "missing")
        ctx_error = (err.get("ctx") or {}).get("error")
        if isinstance(ctx_error, _FieldError):
            param = ".".join(x for x in (param, ctx_error.field) if x)
            raise ApiError(str(ctx_error), param=param) from None
        msg = err["msg"].removeprefix("Value error, ")
        raise ApiError(f"{param or 'body'}: {msg}" + _input_hint(err), param=param) from None


def _input_hint(err: dict) -> str:
    if err["type"] == "missing":
        return ""
    text = repr(err.get("input"))
    return f" (got {text[:60]}{'…' if len(text) > 60 else ''})"


# ---- body -> scheduler Request ---------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Defaults:
    """What a request that omits a field gets (fingerprinted by the batch job's manifest)."""

    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0
    max_tokens: int = 1024  # chat and generate; capped by the room left in the context window
    completion_max_tokens: int = 16  # /v1/completions, as OpenAI's API
    thinking_budget: int | None = None
    repetition_stop: int | None = 3000

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)


@dataclasses.dataclass
class Prepared:
    """A validated request ready for the scheduler, with what the response needs."""

    request: Request
    kind: Literal["chat", "completion", "generate"]
    prompt_ids: list[int]
    logprobs: bool
    top_logprobs: int
    tools: bool


def render_messages(messages: list[ChatMessage], tools: list[Tool] | None, tokenizer) -> str:
    """The prompt text of chat `messages` (and `tools`) rendered with the tokenizer's chat template."""
    if tokenizer.chat_template is None:
        raise ApiError("this model's tokenizer has no chat template; use /v1/completions", param="messages")
    plain = []
    for i, m in enumerate(messages):
        d = m.model_dump(exclude_none=True)
        if d["role"] == "developer":
            d["role"] = "system"
        if isinstance(d.get("content"), list):
            d["content"] = [{"type": "text", "text": p["text"]} for p in d["content"]]
        for call in d.get("tool_calls", ()):
            args = call["function"]["arguments"]
            if isinstance(args, str):
                try:
                    call["function"]["arguments"] = json.loads(args) if args.strip() else {}
                except json.JSONDecodeError as e:
                    raise ApiError(f"messages.{i}.tool_calls: arguments are not JSON ({e.msg})",
                                   param=f"messages.{i}.tool_calls") from None
        if d["role"] in ("system", "user") and isinstance(d.get("content"), list):
            d["content"] = "".join(p["text"] for p in d["content"])  # M1's template reads one text item
        plain.append(d)
    tool_schemas = [t.function.model_dump(exclude_none=True) for t in tools] if tools else None
    try:
        return tokenizer.apply_chat_template(plain, tools=tool_schemas, add_generation_prompt=True)
    except (ValueError, TypeError) as e:
        raise ApiError(f"messages: {e}", param="messages") from None


def build_request(body: BaseModel, tokenizer, *, context_window: int, defaults: Defaults = Defaults(),
                  request_id: str | None = None, default_seed: int | None = None) -> Prepared:
    """The scheduler `Request` for a validated body (`ChatCompletionRequest`, `CompletionRequest` or
    `GenerateRequest`); ApiError naming the field when the prompt or `max_tokens` does not fit `context_window`.

    An absent `seed` becomes `default_seed` (random when None); seeds are taken modulo 2**32.
    """
    if isinstance(body, ChatCompletionRequest):
        kind, prompt_param = "chat", "messages"
        text = render_messages(body.messages, body.tools if body.tool_choice != "none" else None, tokenizer)
        ids = encode_text(tokenizer, text, block_chars=ENCODE_BLOCK_CHARS)
        max_param = "max_completion_tokens" if body.max_completion_tokens is not None else "max_tokens"
        asked = body.max_completion_tokens if body.max_completion_tokens is not None else body.max_tokens
        logprobs, top = body.logprobs, body.top_logprobs or 0
        default_max, tools = defaults.max_tokens, bool(body.tools) and body.tool_choice != "none"
    elif isinstance(body, CompletionRequest):
        kind, prompt_param, max_param, asked = "completion", "prompt", "max_tokens", body.max_tokens
        prompt = body.prompt[0] if isinstance(body.prompt, list) and isinstance(body.prompt[0], (str, list)) \
            else body.prompt
        if isinstance(prompt, str):
            ids = encode_text(tokenizer, prompt, block_chars=ENCODE_BLOCK_CHARS)
        else:
            ids = list(prompt)
            bad = [t for t in ids if not 0 <= t < tokenizer.vocab_size]
            if bad:
                raise ApiError(f"prompt has token id {bad[0]} outside the vocabulary [0, {tokenizer.vocab_size})",
                               param="prompt")
        logprobs, top = body.logprobs is not None, body.logprobs or 0
        default_max, tools = defaults.completion_max_tokens, False
    elif isinstance(body, GenerateRequest):
        kind, prompt_param, max_param, asked = "generate", "input", "max_output_tokens", body.max_output_tokens
        if isinstance(body.input, str):
            ids = encode_text(tokenizer, body.input, block_chars=ENCODE_BLOCK_CHARS)
        else:
            ids = encode_text(tokenizer, render_messages(body.input, body.tools, tokenizer),
                              block_chars=ENCODE_BLOCK_CHARS)
        logprobs, top = body.top_logprobs > 0, body.top_logprobs
        default_max, tools = defaults.max_tokens, bool(body.tools)
        if body.context_window is not None:
            if body.context_window > context_window:
                raise ApiError(f"context_window={body.context_window} is larger than this server's context window "
                               f"({context_window} tokens)", param="context_window")
            context_window = body.context_window
    else:
        raise TypeError(f"not a request body: {type(body).__name__}")
    if not ids:
        raise ApiError(f"{prompt_param} renders to an empty prompt", param=prompt_param)
    room = context_window - len(ids)
    if room < 1:
        raise ApiError(f"{prompt_param} has {len(ids)} tokens; the context window is {context_window} tokens",
                       param=prompt_param)
    if asked is not None and asked > room:
        raise ApiError(f"{max_param}={asked} does not fit: the prompt has {len(ids)} tokens and the context window "
                       f"is {context_window} tokens (at most {room})", param=max_param)
    max_new = asked if asked is not None else min(default_max, room)
    seed = body.seed if body.seed is not None else default_seed
    if seed is None:
        seed = secrets.randbits(32)
    stops = (body.stop,) if isinstance(body.stop, str) else tuple(body.stop or ())
    sampling = SamplingParams(
        temperature=body.temperature if body.temperature is not None else defaults.temperature,
        top_p=body.top_p if body.top_p is not None else defaults.top_p,
        top_k=body.top_k if body.top_k is not None else defaults.top_k,
        min_p=body.min_p if body.min_p is not None else defaults.min_p,
        seed=seed % 2**32, max_new_tokens=max_new, stop_strings=stops, repetition_stop=defaults.repetition_stop)
    budget = body.thinking_budget if body.thinking_budget is not None else defaults.thinking_budget
    request = Request(prompt=ids, sampling=sampling, request_id=request_id, thinking_budget=budget,
                      expert_threshold=body.expert_threshold, top_logprobs=top,
                      return_routed_experts=body.return_routed_experts)
    return Prepared(request=request, kind=kind, prompt_ids=ids, logprobs=logprobs, top_logprobs=top, tools=tools)


def refused(error: Exception, prepared: Prepared) -> ApiError:
    """The 400 for a request the scheduler refused at `submit` (a GenerationError), naming the API field its
    message is about (`expert_threshold`, `return_routed_experts`, `thinking_budget`, `top_logprobs`)."""
    message = str(error)
    fields = ("expert_threshold", "return_routed_experts", "thinking_budget", "top_logprobs")
    param = next((f for f in fields if message.startswith(f)), None)
    if param == "top_logprobs" and prepared.kind == "completion":
        param = "logprobs"
    return ApiError(message, param=param)


# ---- responses --------------------------------------------------------------------------------------------------


def usage_body(prompt_tokens: int, completion_tokens: int, reasoning_tokens: int, cached_tokens: int) -> dict:
    """OpenAI's `usage` with `completion_tokens_details.reasoning_tokens` and `prompt_tokens_details.cached_tokens`."""
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens,
            "completion_tokens_details": {"reasoning_tokens": reasoning_tokens},
            "prompt_tokens_details": {"cached_tokens": cached_tokens}}


def output_usage(output) -> dict:
    """`usage_body` of a finished `RequestOutput`."""
    return usage_body(output.prompt_tokens, len(output.tokens), output.reasoning_tokens, output.cached_tokens)


def visible_text(text: str, token_ids: list[int], finish_reason: str | None, tokenizer) -> str:
    """`text` without the text of a final special stop token (`<end_of_sentence>`): what a client should see."""
    if finish_reason == "stop" and token_ids and token_ids[-1] in tokenizer.special_token_ids:
        tail = tokenizer.decode([token_ids[-1]])
        if tail and text.endswith(tail):
            return text[: -len(tail)]
    return text


def _finite(x: float) -> float:
    """A JSON-safe log-prob (−inf becomes −9999.0, as OpenAI reports impossible tokens)."""
    return float(x) if math.isfinite(x) else -9999.0


def chat_logprobs(token_ids, logprobs, top_logprobs, tokenizer) -> list[dict]:
    """OpenAI chat `logprobs.content`: per token its text, log-prob, UTF-8 bytes and the top alternatives."""
    out = []
    for i, (tid, lp) in enumerate(zip(token_ids, logprobs, strict=True)):
        text = tokenizer.decode([tid])
        alts = top_logprobs[i] if top_logprobs else []
        out.append({"token": text, "logprob": _finite(lp), "bytes": list(text.encode("utf-8")),
                    "top_logprobs": [{"token": (t := tokenizer.decode([a])), "logprob": _finite(alp),
                                      "bytes": list(t.encode("utf-8"))} for a, alp in alts]})
    return out


def completion_logprobs(token_ids, logprobs, top_logprobs, tokenizer, text_offset: int = 0) -> dict:
    """OpenAI (legacy) completions `logprobs`: tokens, token_logprobs, top_logprobs (dicts), text_offset."""
    tokens = [tokenizer.decode([t]) for t in token_ids]
    offsets, pos = [], text_offset
    for t in tokens:
        offsets.append(pos)
        pos += len(t)
    tops = None
    if top_logprobs is not None:
        tops = [{tokenizer.decode([a]): _finite(alp) for a, alp in alts} for alts in top_logprobs]
    return {"tokens": tokens, "token_logprobs": [_finite(x) for x in logprobs], "top_logprobs": tops,
            "text_offset": offsets}


def tool_call_body(call: dict, index: int, call_id: str) -> dict:
    """One parsed M1 tool call `{"name", "arguments"}` as an OpenAI tool call (arguments as a JSON string)."""
    return {"index": index, "id": call_id, "type": "function",
            "function": {"name": call["name"], "arguments": json.dumps(call["arguments"], ensure_ascii=False)}}


def new_id(prefix: str) -> str:
    return f"{prefix}-{secrets.token_hex(12)}"


def chat_completion_body(output, prepared: Prepared, tokenizer, *, model: str, response_id: str,
                         created: int) -> dict:
    """The `chat.completion` object of a finished request: reasoning (as `reasoning_content` and `reasoning`),
    content and tool calls parsed from M1's output, log-probs when asked, usage."""
    text = visible_text(output.text or "", output.tokens, output.finish_reason, tokenizer)
    parsed = chat.parse_output(text) if prepared.tools or chat.THINK_OPEN in text or chat.THINK_CLOSE in text \
        else chat.ParsedOutput(reasoning=None, content=text.strip())
    if not prepared.tools and parsed.tool_calls:  # no tools offered: tool-call text stays content
        parsed = chat.ParsedOutput(reasoning=parsed.reasoning, content=chat.split_reasoning(text)[1].strip())
    message: dict[str, Any] = {"role": "assistant", "content": parsed.content}
    if parsed.reasoning is not None:
        message["reasoning_content"] = message["reasoning"] = parsed.reasoning
    finish = OPENAI_FINISH_REASON[output.finish_reason]
    if parsed.tool_calls:
        message["tool_calls"] = [tool_call_body(c, i, f"call_{response_id[-12:]}_{i}")
                                 for i, c in enumerate(parsed.tool_calls)]
        for c in message["tool_calls"]:
            del c["index"]
        finish = "tool_calls" if finish == "stop" else finish
    choice = {"index": 0, "message": message, "finish_reason": finish, "logprobs": None}
    if prepared.logprobs:
        choice["logprobs"] = {"content": chat_logprobs(output.tokens, output.logprobs,
                                                       output.top_logprobs if prepared.top_logprobs else None,
                                                       tokenizer)}
    return {"id": response_id, "object": "chat.completion", "created": created, "model": model,
            "choices": [choice], "usage": output_usage(output)}


def completion_body(output, prepared: Prepared, tokenizer, *, model: str, response_id: str, created: int) -> dict:
    """The `text_completion` object of a finished request (the raw generated text, log-probs when asked)."""
    text = visible_text(output.text or "", output.tokens, output.finish_reason, tokenizer)
    choice = {"index": 0, "text": text, "finish_reason": OPENAI_FINISH_REASON[output.finish_reason],
              "logprobs": None}
    if prepared.logprobs:
        choice["logprobs"] = completion_logprobs(output.tokens, output.logprobs,
                                                 output.top_logprobs if prepared.top_logprobs else None, tokenizer)
    return {"id": response_id, "object": "text_completion", "created": created, "model": model,
            "choices": [choice], "usage": output_usage(output)}


def generate_body(output, prepared: Prepared, tokenizer, *, model: str, response_id: str, created: int) -> dict:
    """The seed endpoint's response: text (and its reasoning / content / tool-call split), finish reason, usage,
    routing logs (`RequestOutput.routing`) and the per-token routed experts when asked."""
    text = visible_text(output.text or "", output.tokens, output.finish_reason, tokenizer)
    parsed = chat.parse_output(text)
    body = {"id": response_id, "object": "minimax-m1.generation", "created": created, "model": model,
            "text": text, "reasoning": parsed.reasoning, "content": parsed.content,
            "tool_calls": parsed.tool_calls if prepared.tools else [],
            "finish_reason": output.finish_reason,
            "usage": {"input_tokens": output.prompt_tokens, "output_tokens": len(output.tokens),
                      "reasoning_tokens": output.reasoning_tokens, "cached_tokens": output.cached_tokens,
                      "total_tokens": output.prompt_tokens + len(output.tokens)},
            "expert_threshold": prepared.request.expert_threshold,
            "thinking_budget": prepared.request.thinking_budget,
            "routing": _jsonable(output.routing)}
    if prepared.top_logprobs:
        body["logprobs"] = chat_logprobs(output.tokens, output.logprobs, output.top_logprobs, tokenizer)
    if prepared.request.return_routed_experts:
        experts = output.routed_experts
        body["routed_experts"] = None if experts is None else experts.tolist()
    return body


def _jsonable(x: Any) -> Any:
    """Plain JSON types of a routing log (numpy / jax scalars and arrays become numbers and lists)."""
    if x is None or isinstance(x, (str, bool, int)):
        return x
    if isinstance(x, float):
        return x if math.isfinite(x) else None
    if isinstance(x, Mapping):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    if hasattr(x, "tolist"):
        return _jsonable(x.tolist())
    return str(x)


# ---- streaming -----------------------------------------------------------------------------------------------------


class ChatStream:
    """`chat.completion.chunk` objects of one request, built from its `Delta`s: the assistant role first, then
    reasoning / content / tool-call increments (split by `OutputStreamParser`), log-probs of each delta's tokens,
    the finish reason, and with `include_usage` a final usage chunk."""

    def __init__(self, prepared: Prepared, tokenizer, *, model: str, response_id: str, created: int,
                 include_usage: bool):
        self.prepared, self.tokenizer = prepared, tokenizer
        self.head = {"id": response_id, "object": "chat.completion.chunk", "created": created, "model": model}
        self.include_usage = include_usage
        self.parser = OutputStreamParser(parse_tools=prepared.tools,
                                         expect_think_close=prepared.request.thinking_budget is not None)
        self.n_calls = 0
        self.tokens: list[int] = []

    def _chunk(self, delta: dict, finish: str | None = None, logprobs: dict | None = None) -> dict:
        chunk = {**self.head, "choices": [{"index": 0, "delta": delta, "logprobs": logprobs,
                                           "finish_reason": finish}]}
        if self.include_usage:
            chunk["usage"] = None
        return chunk

    def start(self) -> list[dict]:
        return [self._chunk({"role": "assistant", "content": ""})]

    def _deltas(self, events) -> list[dict]:
        out = []
        for kind, value in events:
            if kind == "content":
                out.append({"content": value})
            elif kind == "reasoning":
                out.append({"reasoning_content": value, "reasoning": value})
            else:
                call = tool_call_body(value, self.n_calls, f"call_{self.head['id'][-12:]}_{self.n_calls}")
                self.n_calls += 1
                out.append({"tool_calls": [call]})
        return out

    def push(self, delta) -> list[dict]:
        """The chunks of one scheduler `Delta` (possibly none: text held back while a tag may be starting)."""
        self.tokens += delta.token_ids
        text = visible_text(delta.text, self.tokens, delta.finish_reason, self.tokenizer)
        events = self.parser.push(text)
        if delta.finish_reason is not None:
            events += self.parser.finish()
        parts = self._deltas(events)
        logprobs = None
        if self.prepared.logprobs and delta.token_ids:
            logprobs = {"content": chat_logprobs(delta.token_ids, delta.logprobs,
                                                 delta.top_logprobs if self.prepared.top_logprobs else None,
                                                 self.tokenizer)}
        chunks = [self._chunk(p) for p in parts]
        if logprobs is not None:
            if chunks:
                chunks[0]["choices"][0]["logprobs"] = logprobs
            else:
                chunks.append(self._chunk({}, logprobs=logprobs))
        if delta.finish_reason is not None:
            finish = OPENAI_FINISH_REASON[delta.finish_reason]
            if self.n_calls and finish == "stop":
                finish = "tool_calls"
            chunks.append(self._chunk({}, finish=finish))
        return chunks

    def usage_chunk(self, output) -> dict:
        return {**self.head, "choices": [], "usage": output_usage(output)}


class CompletionStream:
    """`text_completion` chunks of one request, one per `Delta` with text or log-probs, then the finish reason."""

    def __init__(self, prepared: Prepared, tokenizer, *, model: str, response_id: str, created: int,
                 include_usage: bool):
        self.prepared, self.tokenizer = prepared, tokenizer
        self.head = {"id": response_id, "object": "text_completion", "created": created, "model": model}
        self.include_usage = include_usage
        self.tokens: list[int] = []
        self.offset = 0

    def start(self) -> list[dict]:
        return []

    def push(self, delta) -> list[dict]:
        self.tokens += delta.token_ids
        text = visible_text(delta.text, self.tokens, delta.finish_reason, self.tokenizer)
        logprobs = None
        if self.prepared.logprobs and delta.token_ids:
            logprobs = completion_logprobs(delta.token_ids, delta.logprobs,
                                           delta.top_logprobs if self.prepared.top_logprobs else None,
                                           self.tokenizer, self.offset)
        self.offset += len(text)
        finish = None if delta.finish_reason is None else OPENAI_FINISH_REASON[delta.finish_reason]
        if not text and logprobs is None and finish is None:
            return []
        chunk = {**self.head, "choices": [{"index": 0, "text": text, "logprobs": logprobs, "finish_reason": finish}]}
        if self.include_usage:
            chunk["usage"] = None
        return [chunk]

    def usage_chunk(self, output) -> dict:
        return {**self.head, "choices": [], "usage": output_usage(output)}
