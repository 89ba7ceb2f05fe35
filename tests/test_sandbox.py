"""The sandbox for model-written code (trainer/sandbox.py) and the code_tests reward: hostile programs end as failed
calls within their time limit, never a hung or crashed run, and leave nothing behind."""

from __future__ import annotations

import json
import os
import uuid
from pathlib import Path

import pytest

from tokenwise.trainer.sandbox import CodeTests, SandboxLimits, extract_code, isolation, parse_tests, run_python

LIMITS = SandboxLimits(timeout_s=3.0, memory_mb=256)
NAMESPACES = pytest.mark.skipif(isolation() != "namespaces",
                                reason="this machine allows no user namespaces: only rlimits protect (README)")
ROOT = Path(__file__).resolve().parents[1]


def _hostile(kind: str, marker: str, port: int = 0) -> str:
    return {
        "infinite loop": "while True:\n    pass",
        "memory bomb": "blocks = []\nwhile True:\n    blocks.append(bytearray(10**7))",
        "fork bomb": "import os\nwhile True:\n    try:\n        os.fork()\n    except OSError:\n        pass",
        "network": f"import socket\nsocket.create_connection(('127.0.0.1', {port}), timeout=2)\nprint('connected')",
        "write outside": f"open({str(ROOT / marker)!r}, 'w').write('x')",
        "write /tmp": f"open('/tmp/{marker}', 'w').write('x')",
        "output flood": "while True:\n    print('x' * 4096)",
        "detached child": (f"import os, time\nif os.fork() == 0:\n    os.setsid()\n    time.sleep(8)\n"
                           f"    open('/tmp/{marker}', 'w').write('x')\nelse:\n    time.sleep(60)"),
    }[kind]


@pytest.mark.parametrize("kind, statuses", [
    ("infinite loop", {"timeout"}), ("memory bomb", {"memory"}), ("fork bomb", {"timeout", "error"}),
    pytest.param("network", {"error"}, marks=NAMESPACES),
    pytest.param("write outside", {"error"}, marks=NAMESPACES),
    pytest.param("write /tmp", {"error"}, marks=NAMESPACES),
    ("output flood", {"output_limit"}), ("detached child", {"timeout"}),
])
def test_hostile_code_ends_as_a_failed_call_within_its_limit(kind, statuses):
    """Each ends as a failed call (never an exception, never a hang) within the timeout plus teardown. The network
    attempt targets a server listening on this machine's loopback, which any process outside the sandbox reaches."""
    import socket
    marker = f"sandbox-escape-{uuid.uuid4().hex}"
    with socket.create_server(("127.0.0.1", 0)) as server:
        result = run_python(_hostile(kind, marker, server.getsockname()[1]), limits=LIMITS)
    assert not result.ok and result.status in statuses, (result.status, result.stderr[-300:])
    assert result.seconds < LIMITS.timeout_s + 2.5
    assert len(result.stdout) + len(result.stderr) <= LIMITS.max_output_bytes
    assert "connected" not in result.stdout
    assert not (ROOT / marker).exists() and not Path("/tmp", marker).exists()
    again = run_python("print(6 * 7)", limits=LIMITS)  # and the next call runs normally
    assert again.ok and again.stdout == "42\n"


def _kernel_caps_root() -> bool:
    """Whether this kernel gives each pid namespace its own pid_max (Linux >= 6.14)."""
    major, minor = (int(x) for x in os.uname().release.split(".")[:2])
    return (major, minor) >= (6, 14)


@pytest.mark.skipif(isolation() != "namespaces" or (os.getuid() == 0 and not _kernel_caps_root()),
                    reason="run as root without a per-namespace pid_max (Linux < 6.14) nothing caps processes")
def test_processes_are_capped_even_for_root():
    """A program that forks sleeping children as fast as it can gets at most max_processes of them (RLIMIT_NPROC) or,
    where the kernel exempts root from that, about 300 (the pid namespace's pid_max): never the thousands that took a
    fork bomb seconds to kill at the timeout. Fails without the pid_max cap when run as root."""
    code = ("import os, time\nn = 0\nwhile n < 1500:\n    try:\n        pid = os.fork()\n    except OSError:\n"
            "        break\n    if pid == 0:\n        time.sleep(30)\n        os._exit(0)\n    n += 1\nprint(n, flush=True)\n")
    result = run_python(code, limits=SandboxLimits(timeout_s=10.0, memory_mb=256, max_processes=16))
    assert result.ok, (result.status, result.stderr[-300:])
    assert 0 < int(result.stdout) < 310


def test_detached_child_is_gone_after_the_call():
    """A child that made itself a new session is still ended with the call: it never writes after the timeout."""
    marker = f"sandbox-late-{uuid.uuid4().hex}"
    result = run_python(_hostile("detached child", marker).replace("time.sleep(8)", "time.sleep(4)"),
                        limits=SandboxLimits(timeout_s=1.0))
    assert result.status == "timeout"
    import time
    time.sleep(4.5)
    assert not Path("/tmp", marker).exists()


def test_a_normal_program_reads_stdin_writes_its_directory_and_exits():
    code = "import sys\nopen('note.txt', 'w').write(sys.stdin.read())\nprint(open('note.txt').read().upper())"
    result = run_python(code, stdin="hello", limits=LIMITS)
    assert result.ok and result.status == "ok" and result.stdout == "HELLO\n"
    failing = run_python("raise SystemExit(3)", limits=LIMITS)
    assert not failing.ok and failing.status == "error" and failing.exit_code == 3


def test_extract_code_and_parse_tests():
    assert extract_code("Here:\n```python\nprint(1)\n```\nand\n```python\nprint(2)\n```") == "print(2)\n"
    assert extract_code("print(3)") == "print(3)"
    assert parse_tests(json.dumps([{"input": "1 2", "output": "3"}])) == [{"input": "1 2", "output": "3"}]
    assert parse_tests("assert f(1) == 2") == "assert f(1) == 2"


def test_code_tests_reward_scores_the_share_of_cases_passed_and_counts_failures():
    reward = CodeTests(SandboxLimits(timeout_s=2.0), workers=2)
    cases = json.dumps([{"input": "1 2", "output": "3"}, {"input": "5 5", "output": "10"},
                        {"input": "2 2", "output": "5"}])
    right = "```python\na, b = map(int, input().split())\nprint(a + b)\n```"
    asserts = "def add(a, b):\n    return a + b"
    scores = reward.batch([
        dict(prompt="p", response=right, answer=cases, truncated=False),                       # 2 of 3 cases
        dict(prompt="p", response="while True: pass", answer=cases, truncated=False),          # 3 timeouts
        dict(prompt="p", response=asserts, answer="assert add(2, 3) == 5", truncated=False),    # asserts pass
        dict(prompt="p", response=asserts, answer="assert add(2, 3) == 6", truncated=False),    # asserts fail
    ])
    assert scores == [pytest.approx(2 / 3), 0.0, 1.0, 0.0]
    stats = reward.take_stats()
    assert stats["sandbox/calls"] == 8
    assert stats["sandbox/timeout_frac"] == pytest.approx(3 / 8)
    assert stats["sandbox/error_frac"] == pytest.approx(1 / 8)  # the failing assert block
    assert stats["sandbox/failed_frac"] == pytest.approx(4 / 8)
    assert reward.take_stats()["sandbox/calls"] == 0  # taken: counts start again


def test_grpo_with_the_code_tests_reward_logs_sandbox_metrics(tmp_path):
    """A GRPO run whose reward runs every response in the sandbox (the tiny model writes no valid program: every
    run fails, and the run goes on) logs sandbox/* each step."""
    import yaml
    from conftest import TINY, _merge, read_metrics
    from tokenwise.trainer.cli import main
    rows = [{"prompt": f"Print {a} + {b}.", "answer": json.dumps([{"input": "", "output": str(a + b)}])}
            for a in range(6) for b in range(6)]
    data = tmp_path / "code.jsonl"
    data.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    recipe = tmp_path / "code.yaml"
    recipe.write_text(yaml.safe_dump({
        **_merge(TINY, {"stages": ["grpo"], "rewards": [{"type": "code_tests", "timeout_s": 2.0}],
                        "grpo": {"steps": 2, "eval_every": 0}, "eval": {"num_prompts": 4}}),
        "data": {"type": "local", "train_files": [str(data)], "heldout_size": 8}}))
    assert main(["train", str(recipe), f"output_dir={tmp_path / 'run'}"]) == 0
    steps = [r for r in read_metrics(tmp_path / "run", "grpo") if "actor/loss" in r]
    assert len(steps) == 2 and all(r["sandbox/calls"] == 16 for r in steps)
    assert all(0 <= r["sandbox/failed_frac"] <= 1 and "reward/code_tests" in r for r in steps)


def test_without_namespaces_the_limits_still_end_runaway_code(monkeypatch):
    """The fallback where the kernel allows no user namespaces: time, memory and output limits still hold."""
    import tokenwise.trainer.sandbox as sandbox
    monkeypatch.setattr(sandbox, "isolation", lambda: "rlimits")
    assert run_python("print(6 * 7)", limits=LIMITS).stdout == "42\n"
    for kind, status in (("infinite loop", "timeout"), ("memory bomb", "memory"), ("output flood", "output_limit")):
        result = run_python(_hostile(kind, "unused"), limits=LIMITS)
        assert result.status == status and result.isolation == "rlimits" and result.seconds < LIMITS.timeout_s + 2.5


def test_python_tool_runs_code_in_the_sandbox_inside_an_episode():
    """The `python` tool: its output is the observation; hostile or failing code is an error observation (a counted
    tool error) within the tool's limit, and the episode goes on."""
    from tokenwise.rl.environments import ToolEnvironment
    from tokenwise.trainer.sandbox import python_tool
    tool = python_tool(SandboxLimits(timeout_s=2.0))
    env = ToolEnvironment([tool], score=lambda row, text: float(row["answer"] in text))
    env.reset({"prompt": "What is 2**20?", "answer": "1048576"})

    def call(code: str):
        return env.step("<tool_call>" + json.dumps({"name": "python", "arguments": {"code": code}}) + "</tool_call>")

    step = call("print(2**20)")
    assert step.observation == [{"role": "tool", "content": "1048576\n"}] and step.info["tool_errors"] == 0
    for code, said in (("while True: pass", "timed out after 2 s"), ("raise ValueError('bad')", "ValueError: bad"),
                       ("x = bytearray(10**10)", "out of memory")):
        step = call(code)
        assert not step.done and step.info["tool_errors"] == 1
        assert step.observation[0]["content"] == f"error: python failed: {said}"
    assert env.step("It is 1048576.").reward == 1.0
    assert tool.schema()["function"]["parameters"]["required"] == ["code"]


def test_a_program_that_never_reads_a_large_input_still_times_out():
    """More input than a pipe holds, to a program that does not read it (and spends no CPU): the call still ends at
    its wall-clock timeout."""
    result = run_python("import time\ntime.sleep(60)", stdin="x" * (1 << 20), limits=SandboxLimits(timeout_s=2.0))
    assert result.status == "timeout" and result.seconds < 2.0 + 2.5


def test_the_code_recipes_problems_are_solved_by_their_reference_solutions():
    """recipes/data/code_tasks.jsonl (recipes/code_tests.yaml): every problem's reference solution, written as a
    model would answer, passes all its cases through the code_tests reward; a program that prints its input back
    passes almost none."""
    from tokenwise.rl.data import local_task
    rows = [json.loads(line) for line in (ROOT / "recipes" / "data" / "code_tasks.jsonl").read_text().splitlines()]
    task = local_task(train_files=[str(ROOT / "recipes" / "data" / "code_tasks.jsonl")], heldout_files=[],
                      heldout_size=4, prompt_key="prompt", answer_key="answer", seed=0)
    assert len(task["train"]) + len(task["heldout"]) == len(rows) >= 20
    reward = CodeTests(SandboxLimits(timeout_s=5.0), workers=2)
    answer = lambda code: f"Here it is:\n```python\n{code}\n```"  # noqa: E731
    items = [dict(prompt=r["prompt"], response=answer(r["solution"]), answer=r["answer"], truncated=False) for r in rows]
    assert reward.batch(items) == [1.0] * len(rows)
    echo = [dict(item, response=answer("print(input())")) for item in items]
    assert sum(reward.batch(echo)) < 0.2 * len(rows)
