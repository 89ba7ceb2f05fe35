"""Environments for multi-turn rollouts: pure Python, no knowledge of processes, engines or tokens.

An environment is made per row. `reset(row)` returns the episode's first messages (chat format: dicts with role and
content); then each assistant turn goes to `step(text)`, which answers with a `StepResult`: the observation (the
messages to append, e.g. tool results; empty when done), a reward and whether the episode is over. The rollout loop
(trainer/rollout/) renders those messages as token ids and appends them to the trajectory — the sampled ids are never
re-tokenized.

Tools are plain Python callables with typed parameters (int, float, str, bool). `Tool.from_function` derives the
JSON schema chat templates take (`apply_chat_template(..., tools=[t.schema() for t in tools])`); a model calls a tool
by writing `<tool_call>{"name": ..., "arguments": {...}}</tool_call>` (the Hermes / Qwen format), which
`parse_tool_calls` reads. A call that names no tool, has arguments of the wrong name or type, or raises, becomes an
error observation the model sees (and a counted tool error), never an exception in the trainer.
"""

from __future__ import annotations

import ast
import inspect
import json
import operator
import re
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

_JSON_TYPES = {int: "integer", float: "number", str: "string", bool: "boolean"}
_TOOL_CALL = re.compile(r"<tool_call>(.*?)</tool_call>", re.DOTALL)


class ToolError(Exception):
    """A tool call the environment cannot run: its message is what the model is told."""


@dataclass(frozen=True)
class Tool:
    name: str
    fn: Callable[..., Any]
    description: str
    params: tuple[tuple[str, type, bool], ...]  # (name, type, required)

    @classmethod
    def from_function(cls, fn: Callable[..., Any], name: str | None = None) -> "Tool":
        """A tool from a function whose parameters are all annotated int, float, str or bool (keyword-callable);
        its docstring's first line describes it."""
        params = []
        hints = inspect.get_annotations(fn, eval_str=True)
        for p in inspect.signature(fn).parameters.values():
            kind = hints.get(p.name)
            if kind not in _JSON_TYPES or p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD, p.POSITIONAL_ONLY):
                raise TypeError(f"tool {fn.__name__}: parameter {p.name!r} must be a keyword parameter annotated "
                                f"as one of {[t.__name__ for t in _JSON_TYPES]}")
            params.append((p.name, kind, p.default is inspect.Parameter.empty))
        doc = inspect.getdoc(fn) or ""
        return cls(name or fn.__name__, fn, doc.splitlines()[0] if doc else "", tuple(params))

    def schema(self) -> dict:
        """The OpenAI / transformers tool format: {"type": "function", "function": {name, description, parameters}}."""
        return {"type": "function", "function": {
            "name": self.name, "description": self.description,
            "parameters": {"type": "object",
                           "properties": {n: {"type": _JSON_TYPES[t]} for n, t, _ in self.params},
                           "required": [n for n, _, req in self.params if req]}}}

    def call(self, arguments: Any) -> str:
        """Run the tool on JSON arguments (checked against its parameters); its result as text."""
        if not isinstance(arguments, dict):
            raise ToolError(f"{self.name}: arguments must be an object, got {json.dumps(arguments)}")
        known = {n: t for n, t, _ in self.params}
        unknown = sorted(set(arguments) - set(known))
        missing = [n for n, _, req in self.params if req and n not in arguments]
        if unknown or missing:
            raise ToolError(f"{self.name}: " + "; ".join(
                ([f"unknown arguments {unknown}"] if unknown else []) + ([f"missing arguments {missing}"] if missing
                                                                          else [])) + f" (takes {sorted(known)})")
        for n, v in arguments.items():
            want = known[n]
            ok = isinstance(v, want) and not (want is not bool and isinstance(v, bool))
            if want is float and isinstance(v, int) and not isinstance(v, bool):
                ok = True
            if not ok:
                raise ToolError(f"{self.name}: argument {n!r} must be {_JSON_TYPES[want]}, got {json.dumps(v)}")
        try:
            return str(self.fn(**arguments))
        except ToolError as e:  # the tool's own account of its failure
            raise ToolError(f"{self.name} failed: {e}") from None
        except Exception as e:  # the tool's own failure is the model's observation
            raise ToolError(f"{self.name} failed: {type(e).__name__}: {e}") from None


@dataclass(frozen=True)
class ToolCall:
    name: str
    arguments: Any


def parse_tool_calls(text: str) -> list[ToolCall | ToolError]:
    """Every <tool_call>{"name": ..., "arguments": {...}}</tool_call> in an assistant turn, in order; a malformed one
    is a ToolError in its place."""
    out: list[ToolCall | ToolError] = []
    for body in _TOOL_CALL.findall(text):
        try:
            call = json.loads(body)
        except json.JSONDecodeError as e:
            out.append(ToolError(f"tool call is not valid JSON ({e.msg} at column {e.colno})"))
            continue
        if not isinstance(call, dict) or not isinstance(call.get("name"), str):
            out.append(ToolError('a tool call must be {"name": ..., "arguments": {...}}'))
            continue
        out.append(ToolCall(call["name"], call.get("arguments", {})))
    return out


@dataclass
class StepResult:
    observation: list[dict]  # messages to append before the next assistant turn ([] when done)
    reward: float            # this turn's reward (the episode's return is their sum)
    done: bool
    info: dict[str, float] = field(default_factory=dict)  # counts for metrics: tool_calls, tool_errors


class Environment:
    """One episode per row: `reset(row)` → first messages; `step(assistant text)` → StepResult."""

    tools: Sequence[Tool] = ()

    def reset(self, row: dict) -> list[dict]:
        raise NotImplementedError

    def step(self, text: str) -> StepResult:
        raise NotImplementedError


class ToolEnvironment(Environment):
    """An episode in which the model may call `tools`: a turn with tool calls gets their results (role 'tool', one
    message per call, in order) and goes on; a turn without any is the final answer, scored by `score(row, text)`.
    `max_tool_turns` turns of tool calls at most; the next one ends the episode with reward 0."""

    def __init__(self, tools: Sequence[Callable[..., Any] | Tool], score: Callable[[dict, str], float], *,
                 system: str | None = None, max_tool_turns: int = 4) -> None:
        self.tools = [t if isinstance(t, Tool) else Tool.from_function(t) for t in tools]
        self._by_name = {t.name: t for t in self.tools}
        self.score, self.system, self.max_tool_turns = score, system, max_tool_turns
        self.row: dict = {}
        self.tool_turns = 0

    def reset(self, row: dict) -> list[dict]:
        self.row, self.tool_turns = row, 0
        first = [{"role": "user", "content": row["prompt"]}]
        return ([{"role": "system", "content": self.system}] if self.system else []) + first

    def step(self, text: str) -> StepResult:
        calls = parse_tool_calls(text)
        if not calls:
            return StepResult([], float(self.score(self.row, text)), True)
        self.tool_turns += 1
        if self.tool_turns > self.max_tool_turns:
            return StepResult([], 0.0, True, {"tool_calls": float(len(calls)), "tool_errors": 0.0, "truncated": 1.0})
        results, errors = [], 0
        for call in calls:
            try:
                if isinstance(call, ToolError):
                    raise call
                tool = self._by_name.get(call.name)
                if tool is None:
                    raise ToolError(f"no tool named {call.name!r} (tools: {sorted(self._by_name)})")
                content = tool.call(call.arguments)
            except ToolError as e:
                errors += 1
                content = f"error: {e}"
            results.append({"role": "tool", "content": content})
        return StepResult(results, 0.0, False, {"tool_calls": float(len(calls)), "tool_errors": float(errors)})


# ------------------------------------------------------------------------------------------------------ calculator
_OPS = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.Div: operator.truediv,
        ast.FloorDiv: operator.floordiv, ast.Mod: operator.mod, ast.Pow: operator.pow}


def calculator(expression: str) -> str:
    """Evaluate an arithmetic expression (+ - * / // % ** and parentheses on numbers)."""
    def ev(node: ast.AST) -> float | int:
        if isinstance(node, ast.Expression):
            return ev(node.body)
        if isinstance(node, ast.Constant) and type(node.value) in (int, float):
            return node.value
        if isinstance(node, ast.UnaryOp) and isinstance(node.op, (ast.USub, ast.UAdd)):
            v = ev(node.operand)
            return -v if isinstance(node.op, ast.USub) else v
        if isinstance(node, ast.BinOp) and type(node.op) in _OPS:
            a, b = ev(node.left), ev(node.right)
            if isinstance(node.op, ast.Pow) and (abs(b) > 64 or abs(a) > 1e6):
                raise ValueError("exponent too large")
            return _OPS[type(node.op)](a, b)
        raise ValueError(f"only numbers and + - * / // % ** are allowed, not {type(node).__name__}")
    if len(expression) > 200:
        raise ValueError("expression longer than 200 characters")
    value = ev(ast.parse(expression, mode="eval"))
    return str(int(value)) if isinstance(value, float) and value.is_integer() else str(value)
