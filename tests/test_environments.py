"""The environment interface (rl/environments.py): typed tools with their JSON schema, tool-call parsing, and an
episode that answers tool calls with observations and scores the final answer. Pure Python: no engine involved."""

from __future__ import annotations

import pytest

from tokenwise.rl.environments import (StepResult, Tool, ToolEnvironment, ToolError, calculator,
                                       parse_tool_calls)
from tokenwise.rl.rewards import exact_answer


def add(a: int, b: int, note: str = "") -> int:
    """Add two integers.

    More text that is not part of the description."""
    return a + b


def test_tool_schema_from_a_typed_function():
    tool = Tool.from_function(add)
    assert tool.schema() == {"type": "function", "function": {
        "name": "add", "description": "Add two integers.",
        "parameters": {"type": "object", "properties": {"a": {"type": "integer"}, "b": {"type": "integer"},
                                                        "note": {"type": "string"}}, "required": ["a", "b"]}}}

    def untyped(x):
        return x
    with pytest.raises(TypeError, match="parameter 'x' must be"):
        Tool.from_function(untyped)


@pytest.mark.parametrize("arguments, message", [
    ({"a": 1}, "missing arguments ['b']"), ({"a": 1, "b": 2, "c": 3}, "unknown arguments ['c']"),
    ({"a": "1", "b": 2}, "argument 'a' must be integer"), ({"a": True, "b": 2}, "argument 'a' must be integer"),
    ([1, 2], "arguments must be an object"),
])
def test_tool_arguments_are_checked_against_the_signature(arguments, message):
    with pytest.raises(ToolError, match=message.replace("[", r"\[").replace("]", r"\]")):
        Tool.from_function(add).call(arguments)
    assert Tool.from_function(add).call({"a": 2, "b": 3}) == "5"


def test_parse_tool_calls_in_order_with_malformed_ones_in_place():
    text = ('<tool_call>{"name": "add", "arguments": {"a": 1, "b": 2}}</tool_call> then '
            '<tool_call>{"name": "add", "arguments": </tool_call><tool_call>[1]</tool_call>')
    calls = parse_tool_calls(text)
    assert calls[0].name == "add" and calls[0].arguments == {"a": 1, "b": 2}
    assert isinstance(calls[1], ToolError) and "not valid JSON" in str(calls[1])
    assert isinstance(calls[2], ToolError)
    assert parse_tool_calls("no call here") == []


def test_calculator_evaluates_arithmetic_and_nothing_else():
    assert calculator("123 * 456") == "56088" and calculator("(7 - 10) / 2") == "-1.5" and calculator("2**10") == "1024"
    for bad in ("__import__('os').system('true')", "[1] * 10**9", "9**9**9", "a + 1"):
        with pytest.raises(ValueError):
            calculator(bad)


def test_tool_episode_answers_calls_then_scores_the_final_answer():
    env = ToolEnvironment([calculator, add], score=lambda row, text: exact_answer(
        prompt=row["prompt"], response=text, answer=row["answer"], truncated=False), system="Use tools.")
    first = env.reset({"prompt": "What is 123*456?", "answer": "56088"})
    assert first == [{"role": "system", "content": "Use tools."}, {"role": "user", "content": "What is 123*456?"}]
    step = env.step('<tool_call>{"name": "calculator", "arguments": {"expression": "123*456"}}</tool_call>'
                    '<tool_call>{"name": "nope", "arguments": {}}</tool_call>')
    assert step == StepResult([{"role": "tool", "content": "56088"},
                               {"role": "tool", "content": "error: no tool named 'nope' (tools: ['add', 'calculator'])"}],
                              0.0, False, {"tool_calls": 2.0, "tool_errors": 1.0})
    bad = env.step('<tool_call>{"name": "calculator", "arguments": {"expression": "import os"}}</tool_call>')
    assert not bad.done and bad.observation[0]["content"].startswith("error: calculator failed: SyntaxError")
    final = env.step("#### 56088")
    assert final.done and final.reward == 1.0 and final.observation == []
    env.reset({"prompt": "q", "answer": "1"})
    for _ in range(env.max_tool_turns):
        assert not env.step('<tool_call>{"name": "add", "arguments": {"a": 0, "b": 1}}</tool_call>').done
    over = env.step('<tool_call>{"name": "add", "arguments": {"a": 0, "b": 1}}</tool_call>')
    assert over.done and over.reward == 0.0 and over.info["truncated"] == 1.0
