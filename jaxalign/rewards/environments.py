"""Environments for multi-turn episodes: the policy writes a turn, the environment answers, until it is done.

The interface (one object per episode, made by the factory `env.name` names):

  env = Factory()                        # 'module:Factory', or a built-in: 'calculator', 'python'
  obs = env.reset(row)                   # row: the prompt's record, every column; obs: text continuing the prompt ('' = none)
  obs, reward, done = env.step(text)     # text: the policy's turn as decoded text (special tokens dropped)

`reset` and `step` run on the host between jitted sampling turns (`jaxalign.loops.episodes`). An episode ends
when `step` says done, at `env.max_turns` policy turns, or when the token budget (train.seq_len -
rollout.prompt_len) runs out. The observation's tokens are in the model's context but never in the loss or
the KL. An environment that raises ends its episode (reward so far kept, the failure logged and counted),
never the run. The episode's reward is the sum of its `step` rewards, added to the reward functions' (which
see the whole response text: the policy's turns and the observations, as the model read them).

Built-in: `ToolEnv` and its two tools. The policy calls a tool by writing `<calc>expression</calc>` (the
calculator: + - * / // % ** and parentheses over numbers, evaluated without `eval`) or `<python>code</python>`
(run in `jaxalign.rewards.sandbox`: timeout, memory limit, no network, no writes outside a temporary
directory); the environment answers `<result>...</result>`. A turn with no call is the final answer: the
episode ends (scored by the reward functions, e.g. `verifiers:exact_answer`).
"""

from __future__ import annotations

import ast
import importlib
import operator
import re
from typing import Any, Protocol


class Environment(Protocol):
  def reset(self, row: dict) -> str: ...

  def step(self, text: str) -> tuple[str, float, bool]: ...


_OPS = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.Div: operator.truediv,
        ast.FloorDiv: operator.floordiv, ast.Mod: operator.mod, ast.Pow: operator.pow, ast.USub: operator.neg,
        ast.UAdd: operator.pos}


def calculate(expression: str) -> str:
  """An arithmetic expression's value as text ('error: ...' for anything else); walks the AST, never `eval`.
  Exponents are capped (|b| <= 64) so a policy cannot ask for a number too large to print."""
  def ev(node):
    if isinstance(node, ast.Expression):
      return ev(node.body)
    if isinstance(node, ast.Constant) and isinstance(node.value, (int, float)) and not isinstance(node.value, bool):
      return node.value
    if isinstance(node, ast.UnaryOp) and type(node.op) in _OPS:
      return _OPS[type(node.op)](ev(node.operand))
    if isinstance(node, ast.BinOp) and type(node.op) in _OPS:
      a, b = ev(node.left), ev(node.right)
      if isinstance(node.op, ast.Pow) and abs(b) > 64:
        raise ValueError("exponent too large")
      return _OPS[type(node.op)](a, b)
    raise ValueError("not arithmetic")

  try:
    v = ev(ast.parse(expression.strip(), mode="eval"))
  except (SyntaxError, ValueError, ZeroDivisionError, OverflowError, TypeError, RecursionError) as e:
    return f"error: {type(e).__name__}"
  if isinstance(v, float) and v.is_integer() and abs(v) < 1e15:
    v = int(v)
  return str(v)


class ToolEnv:
  """A single-tool environment: the policy's `<tag>input</tag>` is answered with `<result>output</result>`;
  a turn without a call ends the episode. Subclass and set `tag` and `run(input) -> output`; `reward(text)`
  (0 by default) scores the final turn."""

  tag = "calc"

  def __init__(self):
    self.row: dict = {}
    self.calls = 0

  def reset(self, row: dict) -> str:
    self.row, self.calls = dict(row), 0
    return ""

  def run(self, text: str) -> str:
    raise NotImplementedError

  def reward(self, text: str) -> float:
    del text
    return 0.0

  def step(self, text: str) -> tuple[str, float, bool]:
    calls = re.findall(rf"<{self.tag}>(.*?)</{self.tag}>", text, re.S)
    if not calls:
      return "", self.reward(text), True
    self.calls += 1
    return f"<result>{self.run(calls[-1])}</result>", 0.0, False


class Calculator(ToolEnv):
  """`<calc>12 * (3 + 4)</calc>` -> `<result>84</result>`."""

  tag = "calc"

  def run(self, text: str) -> str:
    return calculate(text)


class PythonTool(ToolEnv):
  """`<python>print(sum(range(10)))</python>` -> `<result>45</result>`: the code runs in the sandbox (10 s,
  512 MB); what it prints, or its error, comes back."""

  tag = "python"
  timeout, memory_mb = 10.0, 512

  def run(self, text: str) -> str:
    from jaxalign.rewards import sandbox
    out = sandbox.run_code(text, timeout=self.timeout, memory_mb=self.memory_mb)
    return (out["stdout"].strip() + (f"\n{out['error']}" if out["error"] else "")).strip()


BUILT_IN = {"calculator": Calculator, "python": PythonTool}


def factory(name: str) -> Any:
  """`env.name` -> the per-episode factory: a built-in name or 'module:attribute'."""
  from jaxalign.errors import ConfigError
  if name in BUILT_IN:
    return BUILT_IN[name]
  mod, _, attr = name.partition(":")
  if not attr:
    raise ConfigError(f"env.name={name!r}: expected one of {sorted(BUILT_IN)} or 'module:Factory'")
  try:
    return getattr(importlib.import_module(mod), attr)
  except (ImportError, AttributeError) as e:
    raise ConfigError(f"env.name={name!r}: cannot import it ({type(e).__name__}: {e})") from e
