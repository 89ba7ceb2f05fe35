"""Multi-turn episodes on any rollout engine (`rollout.env`): the model writes a turn, the environment answers, and
the answer's tokens are appended to the trajectory as ids — the sampled ids are never decoded and re-tokenized, so the
learner trains on exactly what the engine sampled.

    prompt ids | turn 1 (sampled) | env tokens | turn 2 (sampled) | env tokens | ... | last turn (sampled)
               |<------------------------------- response ------------------------------------------->|
    response_mask: 1 on sampled tokens (every loss and statistic counts these); context_mask: 1 on env tokens

`MultiTurnRollout` wraps an engine (trainer/rollout/hf.py or vllm.py) and has its interface, so debug and cluster mode
(a rollout actor builds it through `build_rollout`) run episodes without knowing it. Each turn is one engine call over
the episodes still going, with the whole trajectory so far as token ids; prefix caching (vLLM) keeps that cheap.
"""

from __future__ import annotations

import math
from typing import Any, Callable

import torch

from tokenwise.rl.environments import Environment, StepResult, ToolEnvironment, calculator
from tokenwise.rl.errors import ConfigError, EnvError, NonFiniteError
from tokenwise.rl.types import EPISODE_STATS, RolloutBatch
from tokenwise.trainer.loading import PromptFormatter, eos_texts


def environment_factory(cfg: Any) -> Callable[[dict], Environment]:
    """cfg is trainer.config.EnvConfig: a function data row -> a fresh Environment."""
    if cfg.type == "tools":
        from tokenwise.trainer.sandbox import SandboxLimits, python_tool
        known = {"calculator": lambda: calculator,
                 "python": lambda: python_tool(SandboxLimits(timeout_s=cfg.python_timeout_s))}
        tools = [known[name]() for name in cfg.tools]
        # the answer is scored by the recipe's rewards (the episode's last turn); the environment gives no reward
        return lambda row: ToolEnvironment(tools, score=lambda row, text: 0.0, max_tool_turns=cfg.max_turns - 1)
    if cfg.type == "python":
        from tokenwise.rl.importing import first_line, import_function
        try:
            make = import_function(cfg.function)
        except Exception as e:
            raise ConfigError(f"rollout.env.function: cannot load {cfg.function!r}: {first_line(e)}") from None

        def checked(row: dict) -> Environment:
            env = make(row)
            if not (callable(getattr(env, "reset", None)) and callable(getattr(env, "step", None))):
                raise ConfigError(f"rollout.env.function {cfg.function!r} returned {type(env).__name__}, not an "
                                  f"Environment (reset(row) -> messages, step(text) -> StepResult)")
            return env
        return checked
    raise ConfigError(f"rollout.env.type {cfg.type!r}: no environment to build")


def call_env(cfg: Any, env: Environment, method: str, row: dict, arg: Any) -> Any:
    """env.reset(row) / env.step(text), with what a user's environment may do wrong as one-line errors."""
    where = f"rollout.env ({cfg.function or cfg.type}): {type(env).__name__}.{method}"
    try:
        out = getattr(env, method)(arg)
    except Exception as e:
        from tokenwise.rl.importing import first_line
        raise EnvError(f"{where} raised {first_line(e)} on prompt {str(row.get('prompt'))[:200]!r}") from e
    if method == "reset" and not (isinstance(out, list) and all(isinstance(m, dict) and "role" in m
                                                                and "content" in m for m in out)):
        raise EnvError(f"{where} returned {type(out).__name__}; it must return the first messages, a list of "
                       f"{{'role': ..., 'content': ...}} dicts")
    if method == "step" and not isinstance(out, StepResult):
        raise EnvError(f"{where} returned {type(out).__name__}; it must return a "
                       f"StepResult(observation, reward, done, info)")
    if method == "step" and not math.isfinite(float(out.reward)):
        raise NonFiniteError(f"{where} returned reward {out.reward} on prompt {str(row.get('prompt'))[:200]!r}; "
                             f"rewards must be finite numbers")
    return out


def tool_schemas(env: Environment) -> list[dict] | None:
    """The schemas of the tools an environment offers (None: no tools)."""
    return [t.schema() for t in getattr(env, "tools", ())] or None


def episode_opening(cfg: Any) -> Callable[[dict], tuple[list[dict], list[dict] | None]]:
    """row -> (an episode's first messages, the tool schemas its prompt offers), as `MultiTurnRollout` opens it, for
    SFT demonstrations of the episodes. The built-in tools' environment is the same for every row, so it is built
    once; a user's (`type: python`) is made per row, as episodes make it."""
    make_env = environment_factory(cfg)
    if cfg.type == "tools":
        env = make_env({})
        schemas = tool_schemas(env)
        return lambda row: (call_env(cfg, env, "reset", row, row), schemas)

    def opening(row: dict) -> tuple[list[dict], list[dict] | None]:
        env = make_env(row)
        return call_env(cfg, env, "reset", row, row), tool_schemas(env)
    return opening


class MultiTurnRollout:
    """An engine that runs episodes: generate(rows, n=G) returns one episode per (row, sample) as a RolloutBatch whose
    response is every turn after the prompt (see the module docstring). Everything else (weight sync, sleep) is the
    wrapped engine's."""

    def __init__(self, engine: Any, *, tokenizer: Any, formatter: PromptFormatter, cfg: Any,
                 make_env: Callable[[dict], Environment] | None = None) -> None:
        self.engine = engine
        self.tokenizer, self.format, self.cfg = tokenizer, formatter, cfg
        self.make_env = make_env or environment_factory(cfg)
        self.eos_texts = eos_texts(tokenizer, engine.eos_ids)
        self.records_routing = False  # routing is recorded per engine call, not per episode (config refuses replay)

    def __getattr__(self, name: str) -> Any:  # the engine's own interface: sync, sleep, attention_sink, ...
        if name == "engine":
            raise AttributeError(name)
        return getattr(self.engine, name)

    @property
    def version(self) -> int:
        return self.engine.version

    @version.setter
    def version(self, value: int) -> None:
        self.engine.version = value

    def generate(self, rows: list[dict], *, n: int, greedy: bool = False, seed: int | None = None,
                 adaptive: dict | None = None, temperature: float | None = None) -> RolloutBatch:
        cfg, tok = self.cfg, self.tokenizer
        episodes = [(row, self.make_env(row)) for row in rows for _ in range(n)]
        prompts, trajs, sampled, logps, temps, vers = [], [], [], [], [], []
        stats = torch.zeros(len(episodes), len(EPISODE_STATS))
        col = {name: i for i, name in enumerate(EPISODE_STATS)}
        tools: list[list[dict] | None] = []
        for row, env in episodes:
            schemas = tool_schemas(env)
            tools.append(schemas)
            prompts.append(self.format.episode_ids(call_env(cfg, env, "reset", row, row), row=row, tools=schemas))
            trajs.append([]), sampled.append([]), logps.append([]), temps.append([]), vers.append([])
        last_text = [""] * len(episodes)
        active = list(range(len(episodes)))
        for turn in range(cfg.max_turns):
            limits = {k: min(self.engine.max_new_tokens, cfg.max_tokens - len(trajs[k])) for k in active}
            for k in [k for k in active if limits[k] <= 0]:
                stats[k, col["cut"]] = 1.0
            active = [k for k in active if limits[k] > 0]
            if not active:
                break
            out = self.engine.generate(
                [episodes[k][0] for k in active], n=1, greedy=greedy, adaptive=adaptive, temperature=temperature,
                seed=None if seed is None else (seed * 1_000_003 + turn * 7_919) % (1 << 62),
                prompt_ids=[prompts[k] + trajs[k] for k in active], max_new_tokens=max(limits.values()))
            going = []
            for b, k in enumerate(active):
                L = int(out.response_mask[b].sum())
                ended = not bool(out.truncated[b])
                text = out.responses[b]
                if L > limits[k]:  # the call's limit is the largest of the episodes': cut this one to its own
                    L, ended = limits[k], False
                    text = tok.decode(out.response_ids[b, :L].tolist(), skip_special_tokens=True)
                ids = out.response_ids[b, :L].tolist()
                trajs[k] += ids
                sampled[k] += [1.0] * L
                logps[k] += out.rollout_logprobs[b, :L].tolist()
                temps[k] += (out.temperatures[b, :L].tolist() if out.temperatures is not None else [1.0] * L)
                vers[k] += out.token_versions[b, :L].tolist()  # a turn may change policy (partial rollouts)
                stats[k, col["turns"]] += 1
                if turn == 0 and episodes[k][0].get("prefix"):
                    text = episodes[k][0]["prefix"] + text  # the environment reads the turn as the model wrote it
                last_text[k] = text
                if not ended:  # the turn hit its token limit: the episode ends here, cut
                    stats[k, col["cut"]] = 1.0
                    continue
                result = call_env(cfg, episodes[k][1], "step", episodes[k][0], text)
                stats[k, col["env_reward"]] += float(result.reward)
                stats[k, col["tool_calls"]] += float(result.info.get("tool_calls", 0.0))
                stats[k, col["tool_errors"]] += float(result.info.get("tool_errors", 0.0))
                if result.info.get("truncated"):
                    stats[k, col["cut"]] = 1.0
                if result.done:
                    continue
                if turn == cfg.max_turns - 1:
                    stats[k, col["cut"]] = 1.0  # the environment expected another turn
                    continue
                context = [] if ids and ids[-1] in self.engine.eos_ids else [self.engine.eos_ids[0]]  # a stop string
                context += self.format.continuation_ids(result.observation, eos_texts=self.eos_texts,
                                                        tools=tools[k])
                if len(trajs[k]) + len(context) >= cfg.max_tokens:  # no room left for another turn
                    stats[k, col["cut"]] = 1.0
                    continue
                trajs[k] += context
                sampled[k] += [0.0] * len(context)
                logps[k] += [0.0] * len(context)
                temps[k] += [1.0] * len(context)
                vers[k] += [-1] * len(context)
                going.append(k)
            active = going
        return self._batch(episodes, prompts, trajs, sampled, logps, temps if adaptive is not None and not greedy
                           else None, stats, last_text, n, vers)

    def _batch(self, episodes: list, prompts: list[list[int]], trajs: list[list[int]], sampled: list[list[float]],
               logps: list[list[float]], temps: list[list[float]] | None, stats: torch.Tensor, texts: list[str],
               n: int, vers: list[list[int]]) -> RolloutBatch:
        pad = self.engine.pad_id
        B, P, T = len(episodes), max(len(p) for p in prompts), max(1, max(len(t) for t in trajs))
        prompt_ids = torch.full((B, P), pad, dtype=torch.long)
        prompt_mask = torch.zeros(B, P, dtype=torch.long)
        response = torch.full((B, T), pad, dtype=torch.long)
        mask, context, logprobs = torch.zeros(B, T), torch.zeros(B, T), torch.zeros(B, T)
        temperatures = torch.ones(B, T) if temps is not None else None
        versions = torch.full((B, T), -1, dtype=torch.int32)
        for k in range(B):
            p, L = prompts[k], len(trajs[k])
            prompt_ids[k, P - len(p):] = torch.tensor(p, dtype=torch.long)
            prompt_mask[k, P - len(p):] = 1
            if L:
                response[k, :L] = torch.tensor(trajs[k], dtype=torch.long)
                mask[k, :L] = torch.tensor(sampled[k])
                context[k, :L] = 1.0 - mask[k, :L]
                logprobs[k, :L] = torch.tensor(logps[k])
                versions[k, :L] = torch.tensor(vers[k], dtype=torch.int32)
                if temperatures is not None:
                    temperatures[k, :L] = torch.tensor(temps[k])
        rows = [row for row, _ in episodes]
        return RolloutBatch(
            prompt_ids=prompt_ids, prompt_mask=prompt_mask, response_ids=response, response_mask=mask,
            rollout_logprobs=logprobs, truncated=stats[:, EPISODE_STATS.index("cut")] > 0,
            prompts=[r["prompt"] for r in rows], answers=[str(r["answer"]) for r in rows], responses=texts,
            group_size=n, temperatures=temperatures, context_mask=context, episode_stats=stats,
            policy_version=min((v for row in vers for v in row if v >= 0), default=self.engine.version),
            token_versions=versions.masked_fill(mask == 0, -1))


def episode_metrics(batch: RolloutBatch, rewards: torch.Tensor) -> dict[str, float]:
    """Per-step episode statistics (multi-turn rollouts): turns, tool calls, the share of episodes that called a tool
    and the share of calls that failed, cut episodes, the environment's return, the whole reward per turn, and
    environment tokens per episode."""
    if batch.episode_stats is None:
        return {}
    s = {name: batch.episode_stats[:, i].double() for i, name in enumerate(EPISODE_STATS)}
    calls = float(s["tool_calls"].sum())
    return {"env/turns_mean": s["turns"].mean().item(), "env/tool_calls_mean": s["tool_calls"].mean().item(),
            "env/tool_use_frac": (s["tool_calls"] > 0).double().mean().item(),
            "env/tool_error_frac": float(s["tool_errors"].sum()) / calls if calls else 0.0,
            "env/cut_frac": s["cut"].mean().item(), "env/reward_mean": s["env_reward"].mean().item(),
            "env/reward_per_turn": (rewards.double() / s["turns"].clamp(min=1)).mean().item(),
            "env/context_tokens_mean": batch.context_mask.sum(1).double().mean().item()}
