"""Incremental split of M1 output text into reasoning, content and tool calls, for streaming (SSE).

`m1jax.chat.parse_output` splits a finished text; `OutputStreamParser` does the same while the text arrives in
pieces, emitting each piece as soon as it cannot be part of a tag. The concatenations of its reasoning and content
events equal `parse_output(text).reasoning` / `.content`, and its tool-call events equal `.tool_calls`, for any
split of `text` (tests/test_server.py checks this). One case needs a hint: a `</think>` that was never opened
makes the text before it reasoning in `parse_output` (a forced end of thinking, a template that opens the block),
which a stream cannot take back once sent as content. With `expect_think_close=True` (a thinking budget is set, so
a `</think>` comes within the budget) text before the first tag is held until it is classified; without it such
text streams as content.
"""

from __future__ import annotations

from m1jax.chat import THINK_CLOSE, THINK_OPEN, TOOL_CALLS_CLOSE, TOOL_CALLS_OPEN, parse_tool_calls


class OutputStreamParser:
    """`push(text)` / `finish()` → events `("reasoning", str)`, `("content", str)`, `("tool_call", {"name",
    "arguments"})`.

    Modes: content (looking for `<think>` — only before any think block — and `<tool_calls>`), reasoning (looking
    for `</think>`), tools (collecting the block until `</tool_calls>`; its calls are emitted when it closes).
    The tail of the unread text that could begin a tag is held back. Like `parse_output`, reasoning and content
    are stripped: leading whitespace is dropped and trailing whitespace held until more text follows it.
    With `parse_tools=False` tool-call blocks stay content.
    """

    def __init__(self, *, parse_tools: bool = True, expect_think_close: bool = False):
        self.parse_tools = parse_tools
        self.holding = expect_think_close  # text before the first think tag is held until classified
        self.mode = "content"
        self.seen_think = False
        self.buf = ""
        self.tool_body = ""
        self.pending = {"content": "", "reasoning": ""}
        self.started = {"content": False, "reasoning": False}

    def _tags(self) -> tuple[str, ...]:
        if self.mode == "reasoning":
            return (THINK_CLOSE,)
        if self.mode == "tools":
            return (TOOL_CALLS_CLOSE,)
        tags = () if self.seen_think else (THINK_OPEN,)
        return tags + ((TOOL_CALLS_OPEN,) if self.parse_tools else ())

    def _emit(self, text: str, events: list) -> None:
        """Text of the current mode: tool-block text is collected; reasoning/content stripped as it goes."""
        if self.mode == "tools":
            self.tool_body += text
            return
        kind = self.mode
        if not self.started[kind]:
            text = text.lstrip()
            if not text:
                return
            self.started[kind] = True
        full = self.pending[kind] + text
        out = full.rstrip()
        self.pending[kind] = full[len(out):]
        if out:
            events.append((kind, out))

    def _close_tools(self, events: list) -> None:
        calls, _ = parse_tool_calls(self.tool_body)
        events += [("tool_call", c) for c in calls]
        self.tool_body = ""

    def push(self, text: str) -> list[tuple[str, object]]:
        """The events `text` (the next piece of output) completes."""
        events: list = []
        self.buf += text
        if self.holding:
            close, start = self.buf.find(THINK_CLOSE), self.buf.find(THINK_OPEN)
            if close != -1 and (start == -1 or close < start):  # everything before an unopened </think> is reasoning
                self.holding, self.seen_think, self.mode = False, True, "reasoning"
                self._emit(self.buf[:close], events)
                self.mode, self.buf = "content", self.buf[close + len(THINK_CLOSE):]
            elif start != -1:
                self.holding = False
            else:
                return events
        while True:
            tags = self._tags()
            hits = [(self.buf.find(t), t) for t in tags]
            hits = [(i, t) for i, t in hits if i != -1]
            if not hits:
                break
            i, tag = min(hits)
            self._emit(self.buf[:i], events)
            self.buf = self.buf[i + len(tag):]
            if tag == THINK_OPEN:
                self.mode, self.seen_think = "reasoning", True
            elif tag == THINK_CLOSE:
                self.mode = "content"
            elif tag == TOOL_CALLS_OPEN:
                self.mode = "tools"
            else:
                self._close_tools(events)
                self.mode = "content"
        hold = max((k for t in tags for k in range(1, len(t)) if self.buf.endswith(t[:k])), default=0)
        self._emit(self.buf[:len(self.buf) - hold], events)
        self.buf = self.buf[len(self.buf) - hold:]
        return events

    def finish(self) -> list[tuple[str, object]]:
        """The events of the text still held back, at the end of the output (an unclosed block ends here)."""
        events: list = []
        if self.holding:
            self.holding = False
            events += self.push("")
        self._emit(self.buf, events)
        self.buf = ""
        if self.mode == "tools":
            self._close_tools(events)
            self.mode = "content"
        return events
