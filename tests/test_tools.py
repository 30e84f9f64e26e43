"""Tools on the host: call parsing (hermes, llama3, a hook), running with a timeout,
responses rendered by chat templates, tools and environments by import path."""

import json
import sys
import threading

import pytest

from grpo_jax.data import demo
from grpo_jax.errors import UserError
from grpo_jax.tools import calls, registry
from grpo_jax.tools.builtin import calculator
from grpo_jax.tools.render import ResponseRenderer

# A Qwen2.5-style template (ChatML; tool results grouped in one user turn as
# <tool_response> blocks), written for these tests.
QWEN_STYLE = (
    "{% if tools %}{{ '<|im_start|>system\\n# Tools\\n<tools>' }}{% for t in tools %}"
    "{{ '\\n' + (t | tojson) }}{% endfor %}{{ '\\n</tools><|im_end|>\\n' }}{% endif %}"
    "{% for m in messages %}"
    "{% if m.role == 'tool' %}"
    "{% if loop.first or messages[loop.index0 - 1].role != 'tool' %}{{ '<|im_start|>user' }}"
    "{% endif %}{{ '\\n<tool_response>\\n' + m.content + '\\n</tool_response>' }}"
    "{% if loop.last or messages[loop.index0 + 1].role != 'tool' %}{{ '<|im_end|>\\n' }}"
    "{% endif %}"
    "{% else %}{{ '<|im_start|>' + m.role + '\\n' + m.content + '<|im_end|>\\n' }}{% endif %}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}")
LLAMA_STYLE = (
    "{% for m in messages %}{{ '<|start_header_id|>' + ('ipython' if m.role == 'tool' else m.role)"
    " + '<|end_header_id|>\\n\\n' + m.content + '<|eot_id|>' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}"
    "{% endif %}")

def test_hermes_parses_each_block_lists_and_string_arguments():
  text = ('Let me compute.<tool_call>\n{"name": "calculator", "arguments": {"expression": "2+3"}}'
          '\n</tool_call> and <tool_call>[{"name": "a", "arguments": "{\\"x\\": 1}"}, '
          '{"name": "b", "arguments": {}}]</tool_call>')
  assert calls.parse_hermes(text) == [calls.ToolCall("calculator", {"expression": "2+3"}),
                                      calls.ToolCall("a", {"x": 1}), calls.ToolCall("b", {})]
  assert calls.parse_hermes("#### 5") == []


def test_a_broken_call_is_a_failed_call_not_a_crash():
  bad_json, = calls.parse_hermes('<tool_call>{"name": "calculator", "arguments": {</tool_call>')
  no_name, = calls.parse_hermes('<tool_call>{"arguments": {}}</tool_call>')
  assert "not valid JSON" in bad_json.error and 'needs a "name"' in no_name.error
  unfinished, = calls.parse_hermes('<tool_call>{"name": "f", "arguments": {"x": 1}}')
  assert unfinished == calls.ToolCall("f", {"x": 1})  # cut off by the length: still read


def test_llama3_calls_are_whole_json_turns():
  assert calls.parse_llama3('<|python_tag|>{"name": "f", "parameters": {"x": 2}}') == [
      calls.ToolCall("f", {"x": 2})]
  assert calls.parse_llama3('{"name": "f", "parameters": {}}; {"name": "g", "parameters": '
                            '{"y": "z"}}') == [calls.ToolCall("f", {}), calls.ToolCall("g", {"y": "z"})]
  assert calls.parse_llama3("{not json} said the model") == []
  assert calls.parse_llama3("The answer is 4") == []


def test_auto_picks_the_format_from_the_template(tmp_path, monkeypatch):
  assert calls.parser_for("auto", LLAMA_STYLE) is calls.parse_llama3
  assert calls.parser_for("auto", QWEN_STYLE.replace("tool_response", "x") + "<tool_call>") is (
      calls.parse_hermes)
  assert calls.close_tag("auto", LLAMA_STYLE) == "" and calls.close_tag("hermes", "") == (
      "</tool_call>")
  (tmp_path / "my_parser.py").write_text(
      "def parse(text):\n  return [{'name': 'echo', 'arguments': {'t': text[:3]}}]\n")
  monkeypatch.syspath_prepend(str(tmp_path))
  parse = calls.parser_for("my_parser:parse", None)
  assert parse("hello") == [calls.ToolCall("echo", {"t": "hel"})]
  with pytest.raises(UserError, match="tool_call_format='xml'"):
    calls.parser_for("xml", None)


def slow(seconds: float) -> str:
  """Sleeps.

  Args:
    seconds: how long
  """
  threading.Event().wait(seconds)
  return "woke"


def test_the_runner_turns_every_failure_into_the_models_error_message():
  runner = calls.ToolRunner(timeout_seconds=0.5)
  tools = {"calculator": calculator, "slow": slow}
  results = runner.run([
      (calls.ToolCall("calculator", {"expression": "6*7"}), tools),
      (calls.ToolCall("calculator", {"expression": "1/0"}), tools),
      (calls.ToolCall("calculator", {"wrong": "1"}), tools),
      (calls.ToolCall("nope", {}), tools),
      (calls.ToolCall("slow", {"seconds": 30.0}), tools),
      (calls.ToolCall("", {}, "the tool call is not valid JSON"), tools),
  ])
  assert results[0] == calls.ToolResult("calculator", "42", False)
  assert [r.failed for r in results] == [False, True, True, True, True, True]
  assert results[1].content == "Error: ZeroDivisionError: division by zero"
  assert "unexpected keyword argument 'wrong'" in results[2].content
  assert results[3].content == "Error: unknown tool 'nope'; available: calculator, slow"
  assert results[4].content == "Error: tool 'slow' timed out after 0.5 s"
  assert results[5].content == "Error: the tool call is not valid JSON"


def test_calculator_evaluates_arithmetic_and_nothing_else():
  assert calculator("3+4-2") == "5" and calculator("(12*7)/4") == "21"
  assert calculator("7/2") == "3.5" and calculator("-2**3") == "-8"
  for hostile in ("__import__('os').system('true')", "9**9**9", "[1]*10**9", "open('x')"):
    with pytest.raises(ValueError):
      calculator(hostile)


@pytest.fixture
def qwen_tokenizer():
  tok = demo.build_demo_tokenizer()
  tok.add_tokens(["<|im_start|>", "<|im_end|>"], special_tokens=True)
  tok.eos_token = "<|im_end|>"
  tok.chat_template = QWEN_STYLE
  return tok


def test_responses_render_as_the_template_writes_tool_messages(qwen_tokenizer):
  schema = registry.as_tool(calculator).schema
  render = ResponseRenderer(qwen_tokenizer, [schema])
  results = [calls.ToolResult("calculator", "5", False), calls.ToolResult("calculator", "9", False)]
  after_close = render.text(results, after_eos=False)
  assert after_close == ("<|im_end|>\n<|im_start|>user\n<tool_response>\n5\n</tool_response>\n"
                         "<tool_response>\n9\n</tool_response><|im_end|>\n<|im_start|>assistant\n")
  # The model ended its turn itself: its EOS is not repeated.
  assert render.text(results, after_eos=True) == after_close[len("<|im_end|>"):]
  ids = render(results, after_eos=True)
  start = qwen_tokenizer.convert_tokens_to_ids("<|im_start|>")
  assert ids.count(start) == 2 and len(ids) == len(after_close) - len("<|im_end|>") - 2 * (
      len("<|im_start|>") - 1) - (len("<|im_end|>") - 1)  # one token per char, markers whole


def test_llama_style_responses_use_the_ipython_role():
  tok = demo.build_demo_tokenizer()
  tok.chat_template = LLAMA_STYLE
  text = ResponseRenderer(tok, []).text([calls.ToolResult("f", "{\"t\": 21}", False)], True)
  assert text == ("<|eot_id|><|start_header_id|>ipython<|end_header_id|>\n\n{\"t\": 21}<|eot_id|>"
                  "<|start_header_id|>assistant<|end_header_id|>\n\n")


def test_the_demo_template_puts_results_in_tool_response_blocks():
  tok = demo.build_demo_tokenizer(tools=True)
  render = ResponseRenderer(tok, [registry.as_tool(calculator).schema])
  assert render.text([calls.ToolResult("calculator", "5", False)], False) == (
      "<tool_response>5</tool_response>")
  ids = render([calls.ToolResult("calculator", "-13", False)], False)
  assert [tok.convert_ids_to_tokens(i) for i in (ids[0], ids[-1])] == [
      "<tool_response>", "</tool_response>"]


def test_a_template_without_tools_support_is_refused_where_it_matters():
  tok = demo.build_demo_tokenizer()
  with pytest.raises(UserError, match="chat template"):
    ResponseRenderer(tok, [])


class Counter:
  """An environment: a counter the model moves."""

  def reset(self, start=0, **row):
    self.value = int(start)
    self.row = row

  def add(self, amount: int) -> str:
    """Adds to the counter.

    Args:
      amount: how much to add
    """
    self.value += amount
    return str(self.value)

  def _private(self):
    return "hidden"


def test_environment_methods_are_tools_and_each_completion_gets_its_own(tmp_path, monkeypatch):
  envs = registry.Environments(Counter)
  assert envs.method_names == ["add"]
  assert envs.schemas[0]["function"]["name"] == "add"
  first, second = envs.start([{"start": 1, "prompt": "p"}, {"start": 10, "prompt": "q"}])
  envs.tools_of(first)["add"](amount=2)
  assert (first.value, second.value, first.row) == (3, 10, {"prompt": "p"})
  module = tmp_path / "my_envs.py"
  module.write_text("class NoReset:\n  def act(self, x: int) -> int:\n    '''Acts.\n\n    Args:\n"
                    "      x: an int\n    '''\n    return x\n")
  monkeypatch.syspath_prepend(str(tmp_path))
  with pytest.raises(UserError, match="without a reset"):
    registry.Environments("my_envs:NoReset")


def test_tools_need_a_schema_and_unique_names():
  def undocumented(x):
    return x
  with pytest.raises(UserError, match="no usable JSON schema"):
    registry.load_tools([undocumented])
  with pytest.raises(UserError, match="several tools named calculator"):
    registry.load_tools("calculator,calculator")
  tool, = registry.load_tools("calculator")
  assert tool.schema["function"]["parameters"]["required"] == ["expression"]
  assert json.dumps(tool.schema)  # what the template gets is plain JSON
  with pytest.raises(UserError, match="tool 'no_such_module_q:f': module 'no_such_module_q'"):
    registry.load_tools("no_such_module_q:f")
  assert "no_such_module_q" not in sys.modules


def test_chat_completions_reach_the_rewards_as_assistant_and_tool_messages():
  """TRL's conversational format for a multi-turn completion: each model turn an assistant
  message, each response's results tool messages between them."""
  import numpy as np  # noqa: PLC0415

  from grpo_jax import sampling  # noqa: PLC0415
  from grpo_jax.tools import stats as tool_stats  # noqa: PLC0415
  tok = demo.build_demo_tokenizer(tools=True)
  call = demo.tool_call_text("2+3=")
  pieces = [(call, 0), ("<tool_response>5</tool_response>", 1), ("#### 5", 0)]
  ids, tool = [], []
  for text, is_tool in pieces:
    part = tok(text, add_special_tokens=False)["input_ids"]
    ids += part
    tool += [is_tool] * len(part)
  ids += [tok.eos_token_id]
  tool += [0]
  width = len(ids) + 3
  pad = lambda x: np.array([x + [0] * (width - len(x))], np.int32)
  rollout = sampling.Rollout(np.ones((1, 2), np.int32), np.ones((1, 2), np.int32), pad(ids),
                             pad([1] * len(ids)), np.zeros((1, width), np.float32),
                             np.array([True]), pad(tool))
  truncated = rollout._replace(completion_mask=pad([1] * (len(ids) - 8)))  # ends in the response
  results = [[[("calculator", "5")]]]
  assert tool_stats.tool_conversations(tok, rollout, results) == [[
      {"role": "assistant", "content": call},
      {"role": "tool", "name": "calculator", "content": "5"},
      {"role": "assistant", "content": "#### 5"}]]
  assert tool_stats.tool_conversations(tok, truncated, results) == [[
      {"role": "assistant", "content": call},
      {"role": "tool", "name": "calculator", "content": "5"}]]


def test_a_tool_that_never_returns_does_not_hold_up_the_exit():
  """The timed-out call's thread is a daemon: the process exits (a thread pool would join
  it at exit and hang for good)."""
  import subprocess  # noqa: PLC0415
  program = (
      "import threading\n"
      "from grpo_jax.tools import calls\n"
      "def hang() -> str:\n"
      "  threading.Event().wait()\n"
      "r, = calls.ToolRunner(0.2).run([(calls.ToolCall('hang', {}), {'hang': hang})])\n"
      "print(r.content)\n")
  done = subprocess.run([sys.executable, "-c", program], capture_output=True, text=True,
                        timeout=120)
  assert done.returncode == 0, done.stderr
  assert done.stdout.strip() == "Error: tool 'hang' timed out after 0.2 s"
