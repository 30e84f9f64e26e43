"""Built-in tools, by name in the `tools` field (like the built-in rewards)."""

from __future__ import annotations

import ast
import operator

_OPERATORS = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul,
              ast.Div: operator.truediv, ast.FloorDiv: operator.floordiv, ast.Mod: operator.mod,
              ast.Pow: operator.pow, ast.USub: operator.neg, ast.UAdd: operator.pos}
_MAX_EXPONENT = 100  # 9**9**9 would hang the host: powers stay small


def _evaluate(node):
  if isinstance(node, ast.Expression):
    return _evaluate(node.body)
  if isinstance(node, ast.Constant) and isinstance(node.value, (int, float)) and not isinstance(
      node.value, bool):
    return node.value
  if isinstance(node, ast.BinOp) and type(node.op) in _OPERATORS:
    left, right = _evaluate(node.left), _evaluate(node.right)
    if isinstance(node.op, ast.Pow) and abs(right) > _MAX_EXPONENT:
      raise ValueError(f"exponent {right} is too large (at most {_MAX_EXPONENT})")
    return _OPERATORS[type(node.op)](left, right)
  if isinstance(node, ast.UnaryOp) and type(node.op) in _OPERATORS:
    return _OPERATORS[type(node.op)](_evaluate(node.operand))
  raise ValueError(f"not an arithmetic expression: {ast.unparse(node)!r}")


def calculator(expression: str) -> str:
  """Evaluates an arithmetic expression: numbers, + - * / // % ** and parentheses.

  Args:
    expression: The expression to evaluate, e.g. "3+4-2" or "(12*7)/4".
  """
  value = _evaluate(ast.parse(expression.strip(), mode="eval"))
  if isinstance(value, float) and value.is_integer():
    value = int(value)
  return str(value)


BUILTIN_TOOLS = {fn.__name__: fn for fn in (calculator,)}
