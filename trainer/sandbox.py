"""Sandboxed execution of model-written Python: the `code_tests` reward (and, with agentic rollouts, a `python` tool).

Every call runs in a process tree of its own, started fresh, in a fresh temporary directory that is removed after:

- **limits** (setrlimit, inherited by everything it starts): address space (`memory_mb`), CPU seconds, file size,
  open files, processes (`max_processes`, counted inside the sandbox), no core dumps. The kernel exempts real root
  from the process limit; with namespaces on Linux >= 6.14 the pid namespace's own `pid_max` caps a fork bomb at
  about 300 processes for root too (without that cap, run by root, thousands pile up before the timeout and take
  seconds to kill);
- **a wall-clock timeout**: past it the whole tree is killed (its own session; with namespaces, killing the pid
  namespace's first process ends every process in it, whatever session it made for itself);
- **an output cap**: stdout and stderr are read as they come, and a call that writes more than `max_output_bytes`
  is killed (an output flood never reaches the trainer's memory);
- **namespaces** where the kernel allows unprivileged user namespaces (probed once): a new user, network, pid and
  mount namespace (`unshare`). The network namespace has no interface but a down loopback: any connection fails.
  In the mount namespace every mount is remounted read-only except the temporary directory, and then every
  capability is dropped (`setpriv`), so the code can neither write outside its directory nor undo the remounts.
  Where namespaces are not available (`isolation()` says 'rlimits'), only the limits, the timeout and the output
  cap protect the machine: no network isolation, and files writable by the trainer's user stay writable. The
  README says so; `sandbox/isolation` is logged with the reward.

`run_python(code)` → `SandboxResult`; every failure (non-zero exit, timeout, memory, output flood, a crash) is a
result with `ok` False and a `status`, never an exception or a hang.
"""

from __future__ import annotations

import json
import math
import os
import re
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

_BOOT = Path(__file__).with_name("sandbox_boot.py")


@dataclass(frozen=True)
class SandboxLimits:
    timeout_s: float = 5.0          # wall clock, the whole call
    memory_mb: int = 512            # address space of each process
    cpu_s: int | None = None        # CPU seconds of each process (None: the timeout, rounded up, + 1)
    max_processes: int = 16         # processes and threads inside the sandbox
    max_output_bytes: int = 65536   # stdout + stderr
    max_file_mb: int = 16           # largest file it may write
    max_open_files: int = 64


@dataclass
class SandboxResult:
    ok: bool          # exited 0 within every limit
    status: str       # 'ok' | 'error' (non-zero exit) | 'timeout' | 'memory' | 'output_limit' | 'killed' (a signal)
    exit_code: int | None
    stdout: str
    stderr: str
    seconds: float
    isolation: str    # 'namespaces' or 'rlimits'


@lru_cache(maxsize=1)
def isolation() -> str:
    """'namespaces' if this machine lets us make user, network, pid and mount namespaces, remount read-only and drop
    capabilities (util-linux `unshare` and `setpriv`, unprivileged user namespaces; probed once by running an empty
    program the way every call runs), else 'rlimits'."""
    if sys.platform != "linux" or not shutil.which("unshare") or not shutil.which("setpriv"):
        return "rlimits"
    work = Path(tempfile.mkdtemp(prefix="tokenwise-sandbox-"))
    try:
        (work / "main.py").write_text("")
        probe = subprocess.run(_namespaced(work, 16), cwd=work, capture_output=True, timeout=20)
        return "namespaces" if probe.returncode == 0 else "rlimits"
    except (OSError, subprocess.TimeoutExpired):
        return "rlimits"
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _namespaced(work: Path, max_processes: int) -> list[str]:
    # the pid namespace's own pid_max caps its processes (zombies too) where the kernel has it (Linux >= 6.14), also
    # for root, whom RLIMIT_NPROC does not bind; the kernel takes no value under 301
    pid_max = max(301, max_processes + 2)
    return [shutil.which("unshare"), "--user", "--map-root-user", "--net", "--pid", "--mount", "--fork",
            "--kill-child", sys.executable, "-I", "-S", str(_BOOT), str(work), shutil.which("setpriv"), sys.executable,
            str(pid_max)]


def _user_tasks() -> int:
    """Processes and threads of this user (what RLIMIT_NPROC counts outside a user namespace)."""
    uid, n = os.getuid(), 0
    for entry in os.scandir("/proc"):
        if entry.name.isdigit():
            try:
                if entry.stat().st_uid == uid:
                    n += len(os.listdir(f"/proc/{entry.name}/task"))
            except OSError:
                continue
    return n


def _set_limits(limits: SandboxLimits, nproc: int) -> None:
    """In the child before exec: its own session and the resource limits."""
    os.setsid()
    cpu = limits.cpu_s if limits.cpu_s is not None else math.ceil(limits.timeout_s) + 1
    memory = limits.memory_mb << 20
    for what, value in ((resource.RLIMIT_AS, memory), (resource.RLIMIT_CPU, cpu),
                        (resource.RLIMIT_FSIZE, limits.max_file_mb << 20), (resource.RLIMIT_CORE, 0),
                        (resource.RLIMIT_NOFILE, limits.max_open_files), (resource.RLIMIT_NPROC, nproc)):
        resource.setrlimit(what, (value, value))


def _reader(stream, sink: list[bytes], budget: list[int], flooded: threading.Event) -> None:
    """Read a pipe to its end, keeping at most the shared byte budget; past it, say so (the caller kills)."""
    while True:
        chunk = stream.read1(65536)
        if not chunk:
            return
        keep = chunk[:max(0, budget[0])]
        budget[0] -= len(chunk)
        if keep:
            sink.append(keep)
        if budget[0] < 0:
            flooded.set()


def _writer(stream, data: bytes) -> None:
    try:
        stream.write(data)
        stream.close()
    except OSError:
        pass  # it exited, or closed its input


def run_python(code: str, *, stdin: str = "", limits: SandboxLimits = SandboxLimits()) -> SandboxResult:
    """Run `code` as `main.py` in a fresh temporary directory under the sandbox, `stdin` as its input. Never raises
    for anything the code does."""
    mode = isolation()
    work = Path(tempfile.mkdtemp(prefix="tokenwise-sandbox-"))
    try:
        (work / "main.py").write_text(code)
        cmd = _namespaced(work, limits.max_processes) if mode == "namespaces" else [sys.executable, "-I", "main.py"]
        # in a user namespace the process limit counts the sandbox's own processes; outside one, all of this user's
        # (root is exempt there: without namespaces a fork bomb run by root is bounded by the timeout only)
        nproc = limits.max_processes if mode == "namespaces" else limits.max_processes + _user_tasks()
        env = {"PATH": "/usr/bin:/bin", "HOME": str(work), "TMPDIR": str(work), "LANG": "C.UTF-8",
               "PYTHONDONTWRITEBYTECODE": "1", "PYTHONHASHSEED": "0"}
        start = time.perf_counter()
        try:
            proc = subprocess.Popen(cmd, cwd=work, env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                    stderr=subprocess.PIPE, preexec_fn=lambda: _set_limits(limits, nproc))
        except OSError as e:
            return SandboxResult(False, "error", None, "", f"sandbox: cannot start: {e}", 0.0, mode)
        out: list[bytes] = []
        err: list[bytes] = []
        budget = [limits.max_output_bytes]
        flooded = threading.Event()
        readers = [threading.Thread(target=_reader, args=(s, sink, budget, flooded), daemon=True)
                   for s, sink in ((proc.stdout, out), (proc.stderr, err))]
        # the input goes in from a thread too: a program that never reads more than a pipe holds must not block us
        readers.append(threading.Thread(target=_writer, args=(proc.stdin, stdin.encode()), daemon=True))
        for r in readers:
            r.start()
        status = None
        deadline = start + limits.timeout_s
        while proc.poll() is None:
            if flooded.is_set():
                status = "output_limit"
                break
            if time.perf_counter() > deadline:
                status = "timeout"
                break
            time.sleep(0.01)
        if status is not None:
            _kill(proc)
        proc.wait()
        for r in readers:
            r.join(timeout=2)
        seconds = time.perf_counter() - start
        stdout = b"".join(out).decode(errors="replace")
        stderr = b"".join(err).decode(errors="replace")
        code_ = proc.returncode
        if status is None:
            if flooded.is_set():
                status = "output_limit"
            elif code_ == 0:
                status = "ok"
            elif "MemoryError" in stderr or code_ in (-signal.SIGSEGV, 128 + signal.SIGSEGV):
                status = "memory"
            elif code_ in (-signal.SIGXCPU, 128 + signal.SIGXCPU):
                status = "timeout"  # the CPU-seconds limit
            elif code_ < 0 or code_ > 128:
                status = "killed"
            else:
                status = "error"
        return SandboxResult(status == "ok", status, code_, stdout, stderr, seconds, mode)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _kill(proc: subprocess.Popen) -> None:
    """SIGKILL the call's session (its process group); with namespaces that includes `unshare`, whose death
    (--kill-child) ends the pid namespace and so every process in it, however it detached itself."""
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


# ------------------------------------------------------------------------------------------------------ python tool
def python_tool(limits: SandboxLimits = SandboxLimits(), max_chars: int = 2000):
    """The `python` tool for environments (rl/environments.py): runs the model's code in the sandbox and answers with
    what it printed (cut to `max_chars`); a failed run answers with its status and the last line of its error, which
    the environment reports as a tool error."""
    from tokenwise.rl.environments import Tool, ToolError

    def python(code: str) -> str:
        """Run Python code in a sandbox (no network, no files outside its directory) and return what it printed."""
        result = run_python(code, limits=limits)
        if not result.ok:
            last = (result.stderr.strip().splitlines() or [""])[-1][:200]
            raise ToolError({"timeout": f"timed out after {limits.timeout_s:g} s", "memory": "out of memory",
                             "output_limit": "printed too much"}.get(result.status, last or f"exit {result.exit_code}"))
        return result.stdout[:max_chars]
    return Tool.from_function(python)


# ------------------------------------------------------------------------------------------------ code_tests reward
_FENCE = re.compile(r"```(?:python|py)?[ \t]*\n(.*?)```", re.DOTALL)


def extract_code(response: str) -> str:
    """The program in a response: its last fenced code block (```python ... ```), else the whole response."""
    blocks = _FENCE.findall(response)
    return blocks[-1] if blocks else response


def parse_tests(answer: str) -> list[dict] | str:
    """A row's tests, from its answer field: a JSON list of {"input": stdin, "output": expected stdout} cases, or
    Python code (asserts) run after the program."""
    text = answer.strip()
    if text.startswith("["):
        try:
            cases = json.loads(text)
        except json.JSONDecodeError:
            cases = None
        if isinstance(cases, list) and all(isinstance(c, dict) and "output" in c for c in cases):
            return [{"input": str(c.get("input", "")), "output": str(c["output"])} for c in cases]
    return answer


class CodeTests:
    """`rewards: [{type: code_tests}]`: the response's program run against the row's tests in the sandbox. With
    stdin/stdout cases, the share of cases whose output matches (whitespace-trimmed lines); with an assert block, 1.0
    when program + asserts exit 0. Every run is sandboxed (`run_python`); a run that fails — an error, a timeout, the
    memory or output limit — scores 0 for that case and is counted in `take_stats()` (logged as sandbox/*)."""

    def __init__(self, limits: SandboxLimits, workers: int = 2) -> None:
        self.limits, self.workers = limits, max(1, workers)
        self._stats: dict[str, float] = {}
        self._lock = threading.Lock()

    def _run(self, code: str, stdin: str) -> SandboxResult:
        result = run_python(code, stdin=stdin, limits=self.limits)
        with self._lock:
            for key in ("calls", result.status):
                self._stats[key] = self._stats.get(key, 0) + 1
            self._stats["seconds"] = self._stats.get("seconds", 0.0) + result.seconds
        return result

    def _score(self, item: dict) -> float:
        program, tests = extract_code(item["response"]), parse_tests(item["answer"])
        if isinstance(tests, str):
            return float(self._run(program + "\n\n" + tests + "\n", "").ok)
        if not tests:
            return 0.0
        passed = 0
        for case in tests:
            result = self._run(program, case["input"])
            passed += result.ok and _lines(result.stdout) == _lines(case["output"])
        return passed / len(tests)

    def batch(self, items: list[dict]) -> list[float]:
        """One score per item (keyword dicts: prompt, response, answer, truncated), `workers` sandboxes at a time."""
        from concurrent.futures import ThreadPoolExecutor
        with ThreadPoolExecutor(self.workers) as pool:
            return list(pool.map(self._score, items))

    def __call__(self, *, prompt: str, response: str, answer: str, truncated: bool) -> float:
        return self.batch([dict(prompt=prompt, response=response, answer=answer, truncated=truncated)])[0]

    def take_stats(self) -> dict[str, float]:
        """sandbox/* of the calls since the last take: calls, failed share, share per failure kind, mean seconds."""
        with self._lock:
            stats, self._stats = self._stats, {}
        calls = stats.get("calls", 0)
        out = {"sandbox/calls": float(calls), "sandbox/failed_frac": 1 - stats.get("ok", 0) / max(1, calls) if calls
               else 0.0, "sandbox/seconds_mean": stats.get("seconds", 0.0) / max(1, calls),
               "sandbox/namespaces": float(isolation() == "namespaces")}
        for kind in ("error", "timeout", "memory", "output_limit", "killed"):
            out[f"sandbox/{kind}_frac"] = stats.get(kind, 0) / max(1, calls)
        return out


def _lines(text: str) -> list[str]:
    return [line.rstrip() for line in text.strip().splitlines()]
