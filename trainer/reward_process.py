"""Your own reward functions (`rewards: [{type: python}]`) run in a process of their own.

A reward that runs past `timeout_s` on one response, ends its process (`os._exit`, a crash, the memory limit) or
returns something that is not a number ends the step with one line naming the reward and the prompt: never a hung
run, never a run that ends without a word. The process is started once per run and kept, so a reward may keep
state between calls (a cache, a counter); it imports only this module, the standard library and your module, so it
is up in well under a second. `reward_specs` turns the recipe's `rewards:` into (name, weight, function).
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import traceback
from multiprocessing.connection import Connection
from typing import Any, Sequence

from tokenwise.rl.errors import RewardCallFailed as CallFailed
from tokenwise.rl.importing import first_line, import_function

START_TIMEOUT_S = 120.0  # importing a user's module (which may import torch) before the first call


class IsolatedReward:
    """A reward function living in a child process; `batch(items)` → one float per item (keyword dicts)."""

    def __init__(self, spec: str, *, what: str, timeout_s: float, memory_mb: int | None = None) -> None:
        self.spec, self.what, self.timeout_s, self.memory_mb = spec, what, timeout_s, memory_mb
        self.proc: subprocess.Popen | None = None
        self.conn: Connection | None = None
        self._start()

    def _start(self) -> None:
        parent, child = socket.socketpair()
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in sys.path if p)}
        self.proc = subprocess.Popen(
            [sys.executable, "-c", "import sys; from trainer.reward_process import serve; serve(*sys.argv[1:])",
             str(child.fileno()), self.spec, str(self.memory_mb or 0)],
            pass_fds=[child.fileno()], env=env, start_new_session=True, stdin=subprocess.DEVNULL)
        child.close()
        self.conn = Connection(parent.detach())
        reply = self._receive(START_TIMEOUT_S, index=-1, doing="loading it")
        if reply[0] != "ready":
            self.close()
            raise CallFailed(-1, f"cannot load {self.spec!r}: {reply[1]}", reply[2] if len(reply) > 2 else "")

    def _receive(self, timeout: float, *, index: int, doing: str) -> tuple:
        assert self.conn is not None and self.proc is not None
        if not self.conn.poll(timeout):
            self.close()
            raise CallFailed(index, f"took longer than {self.what}.timeout_s ({timeout:g} s) {doing}; it was stopped")
        try:
            return self.conn.recv()
        except (EOFError, OSError):
            code = self.proc.wait(timeout=10)
            self.close()
            how = f"was killed by signal {-code}" if code < 0 else f"exited with status {code}"
            limit = f" (memory limit {self.what}.memory_mb={self.memory_mb})" if self.memory_mb and code < 0 else ""
            raise CallFailed(index, f"ended its process while {doing}: the process {how}{limit}") from None

    def batch(self, items: Sequence[dict]) -> list[float]:
        if self.proc is None or self.proc.poll() is not None:
            self._start()
        self.conn.send(list(items))
        values = []
        for i in range(len(items)):
            reply = self._receive(self.timeout_s, index=i, doing="scoring a response")
            if reply[0] != "ok":
                raise CallFailed(i, f"raised {reply[1]}", reply[2])
            values.append(reply[1])
        return values

    def __call__(self, **item: Any) -> float:
        return self.batch([item])[0]

    def close(self) -> None:
        if self.conn is not None:
            self.conn.close()
            self.conn = None
        if self.proc is not None:
            if self.proc.poll() is None:
                try:
                    os.killpg(self.proc.pid, signal.SIGKILL)  # the reward's own children too
                except ProcessLookupError:
                    pass
            self.proc.wait()
            self.proc = None

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:
            pass


def serve(fd: str, spec: str, memory_mb: str) -> None:
    """The reward process: load `spec`, then answer each batch of keyword dicts with one reply per item."""
    conn = Connection(int(fd))
    memory_mb = int(memory_mb)
    if memory_mb:
        import resource
        resource.setrlimit(resource.RLIMIT_AS, (memory_mb << 20, memory_mb << 20))
    try:
        fn = import_function(spec)
        if not callable(fn):
            raise TypeError(f"{spec!r} is not callable")
    except BaseException as e:  # user code: anything
        conn.send(("error", first_line(e), traceback.format_exc()))
        return
    conn.send(("ready",))
    while True:
        try:
            items = conn.recv()
        except (EOFError, OSError):
            return
        for item in items:
            try:
                value = fn(**item)
                if isinstance(value, bool) or not isinstance(value, (int, float)):
                    try:
                        value = float(value)  # numpy / torch scalars
                    except Exception:
                        raise TypeError(f"returned {type(value).__name__} {value!r:.60}, not a number") from None
                conn.send(("ok", float(value)))
            except BaseException as e:  # SystemExit and KeyboardInterrupt included: report, keep serving
                conn.send(("raised", first_line(e), traceback.format_exc()))



def reward_specs(configs: Sequence) -> list[tuple[str, float, Any]]:
    """The recipe's `rewards:` entries (trainer.config reward dataclasses) → (name, weight, function) for
    rl.rewards.compute_rewards. `python` rewards are loaded in a process of their own now (an import error is
    reported before any training; `isolated: false` loads them here); close them with `close_rewards`."""
    from tokenwise.rl.errors import RewardError
    from tokenwise.rl.rewards import REWARDS, load_function
    specs: list[tuple[str, float, Any]] = []
    try:
        for i, cfg in enumerate(configs):
            if cfg.type == "python" and not cfg.isolated:
                specs.append((cfg.function.rpartition(":")[2], cfg.weight,
                              load_function(cfg.function, what=f"rewards[{i}].function")))
            elif cfg.type == "python":
                try:
                    fn = IsolatedReward(cfg.function, what=f"rewards[{i}]", timeout_s=cfg.timeout_s,
                                        memory_mb=cfg.memory_mb)
                except CallFailed as e:
                    error = RewardError(f"rewards[{i}].function: {e.reason}")
                    error.detail = e.detail
                    raise error from None
                specs.append((cfg.function.rpartition(":")[2], cfg.weight, fn))
            elif cfg.type == "code_tests":
                from tokenwise.trainer.sandbox import CodeTests, SandboxLimits
                limits = SandboxLimits(timeout_s=cfg.timeout_s, memory_mb=cfg.memory_mb,
                                       max_output_bytes=cfg.max_output_kb << 10, max_processes=cfg.max_processes)
                specs.append((cfg.type, cfg.weight, CodeTests(limits, workers=cfg.workers)))
            else:
                specs.append((cfg.type, cfg.weight, REWARDS.get(cfg.type)))
    except BaseException:
        close_rewards(specs)
        raise
    return specs


def close_rewards(specs: Sequence[tuple[str, float, Any]]) -> None:
    """Stop the processes of isolated rewards."""
    for _, _, fn in specs:
        if isinstance(fn, IsolatedReward):
            fn.close()
