"""The ``calculator`` environment: the model may call a calculator with ``<calc>12*34</calc>``.

Each model turn that contains a call gets the result back as a tool message
(``<result>408</result>``); a turn without a call is the model's answer and ends the episode. The
final reward comes from the stage's ``rewards`` (e.g. ``exact_match`` on the answer); a call adds
``call_reward`` (0 by default). An expression the calculator refuses (not arithmetic, too large)
is answered with ``<error>...</error>``: the model's mistake, not the environment's.
"""

from __future__ import annotations

import ast
import operator
import re

from pydantic import Field

from rayalign.environments import Environment, EnvironmentConfig, Observation

_OPS = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.Div: operator.truediv,
        ast.FloorDiv: operator.floordiv, ast.Mod: operator.mod, ast.Pow: operator.pow}
_UNARY = {ast.UAdd: operator.pos, ast.USub: operator.neg}


def evaluate(expression: str, max_abs: float = 1e15) -> int | float:
    """The value of an arithmetic expression (numbers, + - * / // % **, parentheses); ValueError on
    anything else, or on a result (or power) beyond ``max_abs``."""

    def ev(node: ast.AST) -> int | float:
        if isinstance(node, ast.Constant) and isinstance(node.value, (int, float)) and not isinstance(node.value, bool):
            return node.value
        if isinstance(node, ast.BinOp) and type(node.op) in _OPS:
            left, right = ev(node.left), ev(node.right)
            if isinstance(node.op, ast.Pow) and abs(right) > 64:
                raise ValueError("exponent too large")
            value = _OPS[type(node.op)](left, right)
        elif isinstance(node, ast.UnaryOp) and type(node.op) in _UNARY:
            value = _UNARY[type(node.op)](ev(node.operand))
        else:
            raise ValueError(f"not arithmetic: {ast.dump(node)[:40]}")
        if abs(value) > max_abs:
            raise ValueError("result too large")
        return value

    try:
        tree = ast.parse(expression.strip(), mode="eval")
        return ev(tree.body)
    except ZeroDivisionError:
        raise ValueError("division by zero") from None
    except SyntaxError:
        raise ValueError("not an expression") from None


class CalculatorConfig(EnvironmentConfig):
    call_reward: float = Field(0.0, description="reward added for each calculator call")
    role: str = Field("tool", description="the role of the result message in the chat template")


class CalculatorEnvironment(Environment):
    """Answers ``<calc>expression</calc>`` with ``<result>value</result>``; a turn without a call ends the episode."""

    name = "calculator"
    Config = CalculatorConfig
    CALL = re.compile(r"<calc>(.*?)</calc>", re.S)

    def step(self, conversation, last_turn_text, last_turn_token_ids) -> Observation:
        calls = self.CALL.findall(last_turn_text)
        if not calls:
            return Observation(done=True, info={"tool_calls": 0.0})
        try:
            value = evaluate(calls[-1])
            if isinstance(value, float) and value.is_integer():
                value = int(value)
            text = f"<result>{value}</result>"
        except ValueError as exc:
            text = f"<error>{exc}</error>"
        return Observation(text=text, role=self.config.role, reward=self.config.call_reward,
                           info={"tool_calls": 1.0})
