"""Chat prompts: rendered with the tokenizer's template; rewards see TRL's formats."""

import pytest

from grpo_jax.data import chat, demo
from grpo_jax.errors import UserError

TEMPLATE = ("{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}{% endfor %}"
            "{% if add_generation_prompt %}<assistant>{% endif %}")


@pytest.fixture
def tokenizer():
  tok = demo.build_demo_tokenizer()
  tok.chat_template = TEMPLATE
  return tok


def test_messages_are_rendered_with_the_generation_prompt(tokenizer):
  prompts = [[{"role": "system", "content": "be brief"}, {"role": "user", "content": "1+2="}]]
  texts, add_special = chat.render_prompts(tokenizer, prompts)
  assert texts == ["<system>be brief<user>1+2=<assistant>"]
  assert add_special is False


def test_plain_prompts_get_the_system_prompt_through_the_template(tokenizer):
  texts, _ = chat.render_prompts(tokenizer, ["1+2="], system_prompt="sys")
  assert texts == ["<system>sys<user>1+2=<assistant>"]
  texts, add_special = chat.render_prompts(tokenizer, ["1+2="], mode="none")
  assert texts == ["1+2="] and add_special is True


def test_without_a_template_plain_text_passes_through_and_messages_are_an_error():
  tok = demo.build_demo_tokenizer()
  assert chat.render_prompts(tok, ["3+4="]) == (["3+4="], True)
  with pytest.raises(UserError, match="no chat template"):
    chat.render_prompts(tok, [[{"role": "user", "content": "hi"}]])
  with pytest.raises(UserError, match="system_prompt needs"):
    chat.render_prompts(tok, ["hi"], system_prompt="sys")


def test_completions_follow_the_prompt_format():
  messages = [[{"role": "user", "content": "q"}]]
  assert chat.completions_for_rewards(messages, ["a"]) == [[{"role": "assistant",
                                                             "content": "a"}]]
  assert chat.completions_for_rewards(["q"], ["a"]) == ["a"]
