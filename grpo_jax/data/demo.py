"""The embedded offline demo task: multi-step arithmetic such as "3+4-2=" -> "5".

It exists so that `python -m grpo_jax.train` with no arguments runs end to end on a CPU
without downloading anything: the data, the tokenizer and the (imperfect) demonstrator for
the supervised warm-up are all generated here.

The demonstrator prefers to guess, so a warmed-up model mostly writes "#### N" with a random
N; GRPO has to discover that writing the reasoning ("3+4=7 7-2=5 #### 5") pays.
"""

from __future__ import annotations

import itertools
import json
import operator

import datasets
import numpy as np
import tokenizers
import transformers
from tokenizers import decoders, models, pre_tokenizers

from grpo_jax.errors import UserError

DIGITS = range(10)
OPERATORS = {"+": operator.add, "-": operator.sub}
SPECIAL_TOKENS = ("<pad>", "<eos>", "<unk>")  # ids 0, 1, 2
PRINTABLE_ASCII = tuple(chr(c) for c in range(32, 127))
DEFAULT_NUM_EVAL = 256


def all_prompts() -> list[str]:
  """Every prompt "a{op1}b{op2}c=" in a fixed order (4000 of them)."""
  return [f"{a}{op1}{b}{op2}{c}="
          for a, op1, b, op2, c in itertools.product(DIGITS, OPERATORS, DIGITS, OPERATORS, DIGITS)]


def answer_range() -> tuple[int, int]:
  """Smallest and largest possible answer, derived from the digits (not hard-coded)."""
  low, high = min(DIGITS), max(DIGITS)
  return low - high - high, high + high + high


def _parse(prompt: str) -> tuple[list[int], list[str]]:
  """Split "3+4-2=" into operands [3, 4, 2] and operators ["+", "-"]."""
  body = prompt.removesuffix("=")
  operands, ops = body[0::2], body[1::2]
  if (not prompt.endswith("=") or len(body) % 2 == 0 or not all(d.isdigit() for d in operands)
      or not all(op in OPERATORS for op in ops)):
    raise UserError(f"demo prompt {prompt!r} is not of the form 'a+b-c=' (single digits, + or -)")
  return [int(d) for d in operands], list(ops)


def solution_steps(prompt: str) -> list[tuple[int, str, int, int]]:
  """The binary steps (x, op, y, z) of a left-to-right evaluation."""
  operands, ops = _parse(prompt)
  steps, value = [], operands[0]
  for op, y in zip(ops, operands[1:]):
    result = OPERATORS[op](value, y)
    steps.append((value, op, y, result))
    value = result
  return steps


def evaluate(prompt: str) -> int:
  """The prompt's value, evaluated left to right."""
  steps = solution_steps(prompt)
  return steps[-1][3] if steps else _parse(prompt)[0][0]


def reasoning_completion(prompt: str) -> str:
  """The step-by-step solution, e.g. "3+4=7 7-2=5 #### 5"."""
  steps = " ".join(f"{x}{op}{y}={z}" for x, op, y, z in solution_steps(prompt))
  return f"{steps} #### {evaluate(prompt)}"


def make_arithmetic_splits(seed: int = 0, num_eval: int = DEFAULT_NUM_EVAL
                           ) -> tuple[datasets.Dataset, datasets.Dataset]:
  """(train, eval) with columns `prompt`, `answer`; eval prompts never appear in train."""
  prompts = all_prompts()
  if not 0 <= num_eval < len(prompts):
    raise UserError(f"demo num_eval={num_eval}; must be in [0, {len(prompts)})")
  order = np.random.default_rng(seed).permutation(len(prompts))
  shuffled = [prompts[i] for i in order]

  def to_dataset(rows: list[str]) -> datasets.Dataset:
    return datasets.Dataset.from_dict(
        {"prompt": rows, "answer": [str(evaluate(p)) for p in rows]},
        features=datasets.Features({"prompt": datasets.Value("string"),
                                    "answer": datasets.Value("string")}))

  return to_dataset(shuffled[num_eval:]), to_dataset(shuffled[:num_eval])


def demonstration(prompt: str, answer: str, rng: np.random.Generator,
                  reasoning_prob: float = 0.4) -> str:
  """A completion from an imperfect demonstrator, for the short supervised warm-up.

  With probability `reasoning_prob` it writes the reasoning; otherwise it guesses
  "#### N" with N uniform over every possible answer, so the guess is usually wrong
  (`answer` is accepted for symmetry with the dataset row; the guess ignores it).
  """
  del answer  # the guesser does not peek
  if not 0.0 <= reasoning_prob <= 1.0:
    raise UserError(f"reasoning_prob={reasoning_prob}; must be in [0, 1]")
  if rng.random() < reasoning_prob:
    return reasoning_completion(prompt)
  low, high = answer_range()
  return f"#### {int(rng.integers(low, high + 1))}"


# The tools demo (configs/tools_demo.py): tool-call markers as single tokens (after the
# characters, so the plain demo's ids do not move) and a chat template in the hermes style
# of Qwen2.5 / SmolLM2, reduced to what a 0.1M-parameter model can take in: messages
# concatenated, tool results in <tool_response> blocks. (It ignores `tools=`: the tiny
# model learns its one tool from the warm-up, not from a schema in the prompt.)
TOOL_TOKENS = ("<tool_call>", "</tool_call>", "<tool_response>", "</tool_response>")
DEMO_TOOLS_CHAT_TEMPLATE = (
    "{%- for m in messages -%}"
    "{%- if m['role'] == 'tool' -%}<tool_response>{{ m['content'] }}</tool_response>"
    "{%- else -%}{{ m['content'] }}{%- endif -%}"
    "{%- endfor -%}")


def tool_call_text(prompt: str) -> str:
  """The demo's calculator call for a prompt: `<tool_call>{"name": "calculator",
  "arguments": {"expression": "3+4-2"}}</tool_call>`."""
  call = {"name": "calculator", "arguments": {"expression": prompt.removesuffix("=")}}
  return f"{TOOL_TOKENS[0]}{json.dumps(call)}{TOOL_TOKENS[1]}"


def tool_demonstration(prompt: str, rng: np.random.Generator, call_prob: float,
                       respond) -> list[tuple[str, bool]]:
  """A tools-demo completion as (text, is_tool_response) segments: with probability
  `call_prob` it calls the calculator and copies the answer (`respond(expression)`: the
  rendered tool response), otherwise it guesses "#### N" like `demonstration`."""
  if not 0.0 <= call_prob <= 1.0:
    raise UserError(f"call_prob={call_prob}; must be in [0, 1]")
  if rng.random() < call_prob:
    return [(tool_call_text(prompt), False), (respond(prompt.removesuffix("=")), True),
            (f"#### {evaluate(prompt)}", False)]
  low, high = answer_range()
  return [(f"#### {int(rng.integers(low, high + 1))}", False)]


def build_demo_tokenizer(tools: bool = False) -> transformers.PreTrainedTokenizerFast:
  """A character-level tokenizer: one token per printable ASCII char, plus <pad> <eos> <unk>
  (and with `tools` the TOOL_TOKENS and DEMO_TOOLS_CHAT_TEMPLATE).

  Built in memory, so the demo needs no tokenizer files. The Fuse decoder concatenates
  tokens (the default would join them with spaces).
  """
  vocab = {token: i for i, token in enumerate(SPECIAL_TOKENS + PRINTABLE_ASCII
                                              + (TOOL_TOKENS if tools else ()))}
  backend = tokenizers.Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
  # Every character is its own piece; "[\s\S]" also isolates newlines (which become <unk>).
  backend.pre_tokenizer = pre_tokenizers.Split(tokenizers.Regex(r"[\s\S]"), behavior="isolated")
  backend.decoder = decoders.Fuse()
  tokenizer = transformers.PreTrainedTokenizerFast(
      tokenizer_object=backend, pad_token="<pad>", eos_token="<eos>", unk_token="<unk>",
      padding_side="left", clean_up_tokenization_spaces=False)
  if tools:  # whole tokens even inside text (the character split would break them up)
    tokenizer.add_tokens([tokenizers.AddedToken(t, special=False, normalized=False)
                          for t in TOOL_TOKENS])
    tokenizer.chat_template = DEMO_TOOLS_CHAT_TEMPLATE
  return tokenizer
