"""m1jax.chat: the real M1 chat template rendered exactly like transformers, message normalization, and parsing of
`<think>` / `<tool_calls>` output."""

import dataclasses
import json

import jinja2
import pytest
from tokenizer_fixtures import BOS, EOS, M1_FORMAT_TEMPLATE, UNK, train_bpe_tokenizer

from m1jax.chat import (
    ParsedOutput,
    apply_chat_template,
    format_tool_calls,
    normalize_messages,
    parse_output,
    split_reasoning,
)
from m1jax.tokenizer import Tokenizer

WEATHER_TOOL = {
    "name": "get_weather",
    "description": "Get the weather for a city <b>&'",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
}
SEARCH_TOOL = {
    "name": "search_web",
    "description": "搜索函数。",
    "parameters": {"type": "object", "properties": {}},
}

# Spec §8: system + tools + user + assistant (with thinking) + tool result + user + generation prompt.
SPEC_MESSAGES = [
    {"role": "system", "content": "You are a helpful assistant."},
    {"role": "user", "content": "Hi"},
    {"role": "assistant", "content": "<think>\nx\n</think>\nHello"},
    {"role": "tool", "name": "get_weather", "content": "sunny"},
    {"role": "user", "content": "Q2"},
]
SPEC_EXPECTED = (
    "<begin_of_document><beginning_of_sentence>system ai_setting=assistant\nYou are a helpful assistant."
    "<end_of_sentence>\n"
    "<beginning_of_sentence>system tool_setting=tools\nYou are provided with these tools:\n<tools>\n"
    '{"name": "get_weather", "description": "Get the weather for a city <b>&\'", "parameters": {"type": "object", '
    '"properties": {"city": {"type": "string"}}, "required": ["city"]}}\n'
    "</tools>\n\n"
    "If you need to call tools, please respond with <tool_calls></tool_calls> XML tags, and provide tool-name and "
    "json-object of arguments, following the format below:\n"
    "<tool_calls>\n{name: <tool-name-1>, arguments: <args-json-object-1>}\n...\n</tool_calls><end_of_sentence>\n"
    "<beginning_of_sentence>user name=user\nHi<end_of_sentence>\n"
    "<beginning_of_sentence>ai name=assistant\n<think>\nx\n</think>\nHello<end_of_sentence>\n"
    "<beginning_of_sentence>tool name=tools\ntool name: get_weather\ntool result: sunny\n\n<end_of_sentence>\n"
    "<beginning_of_sentence>user name=user\nQ2<end_of_sentence>\n"
    "<beginning_of_sentence>ai name=assistant\n"
)


@pytest.fixture(scope="session")
def m1_template(fixtures_dir):
    return json.loads((fixtures_dir / "minimax-m1" / "tokenizer_config.json").read_text())["chat_template"]


@pytest.fixture(scope="session")
def mr_niah_dialogues(fixtures_dir):
    dialogues = []
    for path in sorted((fixtures_dir / "mr-niah").glob("*.jsonl")):
        dialogues += [json.loads(line)["messages"] for line in path.read_text().splitlines() if line.strip()]
    assert len(dialogues) >= 60 and all(isinstance(m["content"], str) for d in dialogues for m in d)
    return dialogues


@pytest.fixture(scope="session")
def bpe_object():
    return train_bpe_tokenizer()


def _hf(bpe_object, chat_template=None):
    """transformers' own tokenizer over the same BPE, with the MiniMax special tokens and `chat_template`."""
    transformers = pytest.importorskip("transformers")
    hf = transformers.PreTrainedTokenizerFast(tokenizer_object=bpe_object, bos_token=BOS, eos_token=EOS, unk_token=UNK)
    hf.chat_template = chat_template
    return hf


@pytest.fixture(scope="session")
def hf_tokenizer(bpe_object, m1_template):
    return _hf(bpe_object, m1_template)


@pytest.fixture(scope="session")
def m1_tokenizer(bpe_object, m1_template):
    return Tokenizer(bpe_object, bos_token=BOS, eos_token=EOS, unk_token=UNK, chat_template=m1_template)


def _hf_render(hf, messages, tools=None, add_generation_prompt=True, **kw):
    return hf.apply_chat_template(
        messages, tools=tools, tokenize=False, add_generation_prompt=add_generation_prompt, **kw
    )


# ---- rendering the real M1 template ------------------------------------------------------------------------------


def test_spec_conversation_renders_the_documented_text(m1_template):
    assert apply_chat_template(SPEC_MESSAGES, chat_template=m1_template, tools=[WEATHER_TOOL]) == SPEC_EXPECTED


def test_compact_fixture_template_renders_the_documented_text():
    """Without the real template: the test tokenizer's template gives the spec §8 text too."""
    assert apply_chat_template(SPEC_MESSAGES, chat_template=M1_FORMAT_TEMPLATE, tools=[WEATHER_TOOL]) == SPEC_EXPECTED


def test_spec_conversation_matches_transformers(hf_tokenizer, m1_tokenizer):
    expected = _hf_render(hf_tokenizer, normalize_messages(SPEC_MESSAGES), tools=[WEATHER_TOOL])
    assert expected == SPEC_EXPECTED
    assert m1_tokenizer.apply_chat_template(SPEC_MESSAGES, tools=[WEATHER_TOOL]) == expected


@pytest.mark.parametrize("add_generation_prompt", [True, False])
@pytest.mark.parametrize("tools", [None, [], [WEATHER_TOOL, SEARCH_TOOL]])
def test_system_tools_and_generation_prompt_variants_match_transformers(
    hf_tokenizer, m1_template, tools, add_generation_prompt
):
    messages = [{"role": "system", "content": "Sys A. "}, {"role": "system", "content": "Sys B."}] + SPEC_MESSAGES[1:]
    expected = _hf_render(hf_tokenizer, normalize_messages(messages), tools, add_generation_prompt)
    ours = apply_chat_template(
        messages, chat_template=m1_template, tools=tools, add_generation_prompt=add_generation_prompt
    )
    assert ours == expected
    assert ("Sys A. Sys B." in ours) and (("tool_setting=tools" in ours) == bool(tools))


def test_mr_niah_dialogues_match_transformers(hf_tokenizer, m1_tokenizer, mr_niah_dialogues):
    for i, dialogue in enumerate(mr_niah_dialogues):
        messages = ([{"role": "system", "content": "You are a helpful assistant."}] if i % 2 else []) + dialogue
        tools = [WEATHER_TOOL] if i % 3 == 0 else None
        expected = _hf_render(hf_tokenizer, normalize_messages(messages), tools)
        assert m1_tokenizer.apply_chat_template(messages, tools=tools) == expected, f"dialogue {i}"
        assert expected.count("<beginning_of_sentence>user name=user\n") == sum(m["role"] == "user" for m in messages)


def test_tokenized_chat_matches_transformers(hf_tokenizer, m1_tokenizer, mr_niah_dialogues):
    messages = normalize_messages(mr_niah_dialogues[0][:4])
    expected = hf_tokenizer.apply_chat_template(messages, tokenize=True, add_generation_prompt=True)
    expected = expected["input_ids"] if hasattr(expected, "keys") else expected
    ids = m1_tokenizer.apply_chat_template(messages, tokenize=True)
    assert ids == list(expected)
    assert ids[:2] == [m1_tokenizer.token_to_id("<begin_of_document>"), m1_tokenizer.bos_token_id]


def test_assistant_tool_calls_and_openai_tool_messages(hf_tokenizer, m1_template):
    messages = [
        {"role": "user", "content": [{"type": "text", "text": "Weather in Paris and news?"}]},
        {
            "role": "assistant",
            "content": "Let me check.",
            "tool_calls": [
                {"id": "c1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}},
                {"id": "c2", "type": "function", "function": {"name": "search_web", "arguments": {"q": "news"}}},
            ],
        },
        {"role": "tool", "tool_call_id": "c1", "content": "sunny"},
        {"role": "tool", "content": [{"name": "search_web", "type": "text", "text": "none"}]},
    ]
    ours = apply_chat_template(messages, chat_template=m1_template, tools=[WEATHER_TOOL, SEARCH_TOOL])
    assert ours == _hf_render(hf_tokenizer, normalize_messages(messages), [WEATHER_TOOL, SEARCH_TOOL])
    assert (
        "<beginning_of_sentence>ai name=assistant\nLet me check.\n<tool_calls>\n"
        '{"name": "get_weather", "arguments": {"city": "Paris"}}\n'
        '{"name": "search_web", "arguments": {"q": "news"}}\n</tool_calls><end_of_sentence>\n'
    ) in ours
    assert "tool name: get_weather\ntool result: sunny\n\n<end_of_sentence>" in ours
    assert "tool name: search_web\ntool result: none\n\n<end_of_sentence>" in ours


def test_compact_fixture_template_renders_like_the_real_one(m1_template, mr_niah_dialogues):
    conversations = [SPEC_MESSAGES, mr_niah_dialogues[0], [{"role": "user", "content": "only"}]]
    for messages in conversations:
        for tools in (None, [WEATHER_TOOL]):
            real = apply_chat_template(messages, chat_template=m1_template, tools=tools)
            assert apply_chat_template(messages, chat_template=M1_FORMAT_TEMPLATE, tools=tools) == real


# ---- generic template features, against transformers --------------------------------------------------------------

FEATURE_TEMPLATE = """
{%- set ns = namespace(n=0) -%}
{%- for m in messages -%}
  {%- if m.role == 'skip' %}{% continue %}{% endif -%}
  {%- if m.role == 'stop' %}{% break %}{% endif -%}
  {%- set ns.n = ns.n + 1 -%}
  [{{ m.role }}|{% generation %}{{ m.content }}{% endgeneration %}|{{ m.reasoning_content | default('-') }}]
{% endfor -%}
{{ ns.n }} {{ tools | tojson(indent=1) }} {{ dict(a=1) | tojson }} {{ bos_token }}{{ extra_var | default('') }}
{%- if add_generation_prompt %}<gen>{% endif -%}
"""


def test_template_features_match_transformers(bpe_object):
    messages = [
        {"role": "user", "content": "a <b> & 'c' 😀", "thinking": "hm"},
        {"role": "skip", "content": "x"},
        {"role": "assistant", "content": "d", "tool_calls": None},
        {"role": "stop", "content": "y"},
        {"role": "user", "content": "never"},
    ]
    tools = [{"name": "t", "description": "<tag> & ünï"}]
    expected = _hf_render(_hf(bpe_object), messages, tools, chat_template=FEATURE_TEMPLATE, extra_var="!")
    ours = apply_chat_template(
        messages, chat_template=FEATURE_TEMPLATE, tools=tools, normalize=False, bos_token=BOS, extra_var="!"
    )
    assert ours == expected
    assert "[user|a <b> & 'c' 😀|hm]" in ours and "never" not in ours and '"<tag> & ünï"' in ours


def test_raise_exception_and_sandbox():
    with pytest.raises(jinja2.TemplateError, match="no system allowed"):
        apply_chat_template([], chat_template="{{ raise_exception('no system allowed') }}")
    with pytest.raises(jinja2.exceptions.SecurityError):
        apply_chat_template([], chat_template="{{ ''.__class__.__mro__ }}{{ [].append(1) }}")
    with pytest.raises(jinja2.exceptions.SecurityError, match="underscore"):
        apply_chat_template([], chat_template="{% set ns = namespace(_x=1) %}")
    assert apply_chat_template([], chat_template="{{ strftime_now('%Y') | length }}") == "4"


# ---- normalization -----------------------------------------------------------------------------------------------


def test_normalize_messages():
    messages = [
        {"role": "system", "content": "s"},
        {"role": "user", "content": ["a", {"type": "text", "text": "b"}], "extra": 1},
        {"role": "assistant", "content": None, "tool_calls": [{"name": "f", "arguments": {"x": 1}}]},
        {"role": "tool", "name": "f", "content": "r"},
    ]
    original = json.dumps(messages)
    out = normalize_messages(messages)
    assert json.dumps(messages) == original, "the input was modified"
    assert out[0] == {"role": "system", "content": [{"type": "text", "text": "s"}]}
    assert out[1] == {"role": "user", "extra": 1, "content": [{"type": "text", "text": t} for t in "ab"]}
    call_text = '<tool_calls>\n{"name": "f", "arguments": {"x": 1}}\n</tool_calls>'
    assert out[2] == {"role": "assistant", "content": [{"type": "text", "text": call_text}]}
    assert out[3]["content"] == [{"type": "text", "text": "r", "name": "f"}]
    assert normalize_messages(out) == out  # idempotent
    assert format_tool_calls([{"name": "f", "arguments": {"x": 1}}]) == call_text


def test_normalize_messages_errors():
    with pytest.raises(ValueError, match=r"message 0 \(role 'tool'\) needs the tool's name"):
        normalize_messages([{"role": "tool", "content": "r", "tool_call_id": "unknown"}])
    with pytest.raises(ValueError, match="message 1 has no 'role'"):
        normalize_messages([{"role": "user", "content": "a"}, {"content": "b"}])
    with pytest.raises(TypeError, match=r"message 0 \(user\): content must be a string or a list"):
        normalize_messages([{"role": "user", "content": 3}])
    with pytest.raises(TypeError, match="content items must be strings or dicts"):
        normalize_messages([{"role": "user", "content": [1]}])
    with pytest.raises(ValueError, match="tool call 0 needs a 'name'"):
        normalize_messages([{"role": "assistant", "tool_calls": [{"arguments": {}}]}])
    with pytest.raises(ValueError, match=r"tool call 0 \(f\): arguments are not valid JSON"):
        normalize_messages([{"role": "assistant", "tool_calls": [{"name": "f", "arguments": "{x"}]}])


def test_render_errors():
    m1_template = M1_FORMAT_TEMPLATE
    with pytest.raises(TypeError, match="messages must be a list of dicts"):
        apply_chat_template("hi", chat_template=m1_template)
    with pytest.raises(TypeError, match="message 0 must be a dict"):
        apply_chat_template(["hi"], chat_template=m1_template)
    with pytest.raises(ValueError, match=r"not valid Jinja \(line 1\)"):
        apply_chat_template([], chat_template="{% if %}")
    with pytest.raises(TypeError, match="chat_template must be a string"):
        apply_chat_template([], chat_template=None)
    with pytest.raises(TypeError, match="tools must be a list"):
        apply_chat_template([], chat_template=m1_template, tools={"name": "f"})
    with pytest.raises(TypeError, match=r"message 0\['content'\]: a object cannot be passed"):
        apply_chat_template([{"role": "user", "content": object()}], chat_template=m1_template, normalize=False)
    with pytest.raises(ValueError, match="needs normalize=True"):
        # the real template indexes content[0]['text']: a bare string content lacks it
        apply_chat_template([{"role": "user", "content": ""}], chat_template=m1_template, normalize=False)


# ---- parsing model output ------------------------------------------------------------------------------------------


def test_parse_plain_and_thinking_output():
    assert parse_output("Just text.\n") == ParsedOutput(reasoning=None, content="Just text.")
    parsed = parse_output("<think>\nStep 1.\nStep 2.\n</think>\n\nThe answer is 42.")
    assert (parsed.reasoning, parsed.content, parsed.tool_calls, parsed.errors) == (
        "Step 1.\nStep 2.", "The answer is 42.", [], []
    )
    assert parse_output("<think>\nstill thinking when the budget ran out") == ParsedOutput(
        reasoning="still thinking when the budget ran out", content=""
    )
    assert parse_output("opened by the template\n</think>\nanswer") == ParsedOutput("opened by the template", "answer")
    assert split_reasoning("<think></think>x") == ("", "x")


def test_parse_tool_calls():
    text = (
        "<think>\nI should call two tools. <tool_calls>\n{\"name\": \"in_thought\"}\n</tool_calls>\n</think>\n"
        "Checking.\n<tool_calls>\n"
        '{"name": "search_web", "arguments": {"query_list": ["\\"OpenAI\\" release"], "query_tag": ["tech"]}}\n'
        '  {"name":"get_weather","arguments":{"city":"東京"}}   \n\n'
        "</tool_calls>"
    )
    parsed = parse_output(text)
    assert parsed.reasoning.startswith("I should call two tools.")
    assert parsed.content == "Checking."
    assert parsed.tool_calls == [
        {"name": "search_web", "arguments": {"query_list": ['"OpenAI" release'], "query_tag": ["tech"]}},
        {"name": "get_weather", "arguments": {"city": "東京"}},
    ]
    assert parsed.errors == []


def test_parse_tool_calls_tolerates_layout_and_string_arguments():
    text = (
        "<tool_calls>\r\n"
        '{\n  "name": "a",\n  "arguments": {"x": [1, 2]}\n}\n'
        '{"name": "b", "arguments": "{\\"y\\": true}"} {"name": "c"}\n'
        "</tool_calls> after"
    )
    parsed = parse_output(text)
    assert parsed.tool_calls == [
        {"name": "a", "arguments": {"x": [1, 2]}},
        {"name": "b", "arguments": {"y": True}},
        {"name": "c", "arguments": {}},
    ]
    assert parsed.content == "after" and parsed.errors == []


def test_parse_malformed_tool_calls_are_reported():
    text = (
        "<tool_calls>\n"
        '{"name": "ok", "arguments": {}}\n'
        "{name: get_weather, arguments: {city: Paris}}\n"
        "   continuation of the broken call\n"
        '["not", "an", "object"]\n'
        '{"arguments": {}}\n'
        '{"name": "f", "arguments": [1]}\n'
        '{"name": "g", "arguments": "not json"}\n'
        '{"name": "ok2", "arguments": {"a": 1}} trailing\n'
        '{"name": "cut", "argu'
    )
    parsed = parse_output(text)
    assert parsed.tool_calls == [{"name": "ok", "arguments": {}}, {"name": "ok2", "arguments": {"a": 1}}]
    errors = parsed.errors
    assert errors[0] == "unterminated <tool_calls> block (no </tool_calls>)"
    assert errors[1].startswith("line 3: invalid JSON") and "continuation of the broken call" in errors[1]
    assert errors[2].startswith("line 5: expected a JSON object, got list")
    assert errors[3].startswith("line 6: missing 'name' string")
    assert errors[4].startswith("line 7: 'arguments' must be a JSON object, got list")
    assert errors[5].startswith("line 8: 'arguments' string is not JSON")
    assert errors[6].startswith("line 9: invalid JSON") and "trailing" in errors[6]
    assert errors[7].startswith("line 10: invalid JSON") and "cut" in errors[7]
    assert len(errors) == 8 and parsed.content == ""


def test_format_then_parse_round_trip():
    calls = [{"name": "f", "arguments": {"s": "a\nb <tool_calls> ü"}}, {"name": "g", "arguments": {}}]
    parsed = parse_output("<think>\nr\n</think>\n" + format_tool_calls(calls))
    assert parsed == ParsedOutput(reasoning="r", content="", tool_calls=calls)
    assert dataclasses.asdict(parsed)["tool_calls"] == calls
    with pytest.raises(TypeError, match="parse_output expects a str"):
        parse_output(None)
