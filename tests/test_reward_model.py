"""A frozen sequence-classification reward model agrees with transformers' and plugs in."""

import numpy as np
import pytest
import torch
import transformers

from grpo_jax.data import demo
from grpo_jax.rewards import compute_rewards, resolve_reward_funcs
from grpo_jax.rewards.model import RewardModel

FAMILIES = {
    "qwen2": (transformers.Qwen2Config, transformers.Qwen2ForSequenceClassification,
              dict(tie_word_embeddings=True)),
    "llama": (transformers.LlamaConfig, transformers.LlamaForSequenceClassification,
              dict(tie_word_embeddings=False)),
}
PROMPTS = ["3+4-2=", "1-1+9=", "7+7+7="]
COMPLETIONS = ["3+4=7 7-2=5 #### 5", "#### 4", "7+7=14 14+7=21 #### 21 and some more words"]


@pytest.fixture(scope="module", params=sorted(FAMILIES))
def reward_dir(request, tmp_path_factory):
  config_cls, model_cls, extra = FAMILIES[request.param]
  tokenizer = demo.build_demo_tokenizer()
  torch.manual_seed(0)
  model = model_cls(config_cls(
      vocab_size=len(tokenizer), hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
      num_key_value_heads=2, intermediate_size=96, num_labels=1,
      pad_token_id=tokenizer.pad_token_id, **extra)).eval()
  with torch.no_grad():
    for param in model.parameters():
      param.normal_(0.0, 0.5) if param.ndim >= 2 else param.add_(0.3 * torch.randn_like(param))
  path = tmp_path_factory.mktemp(request.param)
  model.save_pretrained(path)
  tokenizer.save_pretrained(path)
  return path, model, tokenizer


def hf_rewards(model, tokenizer, texts):
  """transformers' score at the last token, one unpadded sequence at a time."""
  out = []
  for text in texts:
    ids = torch.tensor([tokenizer(text)["input_ids"]])
    with torch.no_grad():
      out.append(float(model(input_ids=ids).logits[0, 0]))
  return np.array(out)


def test_rewards_match_transformers(reward_dir):
  path, model, tokenizer = reward_dir
  ours = RewardModel(str(path), batch_size=2)  # batches of 2: padding inside a batch
  texts, _ = ours.texts(PROMPTS, COMPLETIONS)
  expected = hf_rewards(model, tokenizer, texts)
  got = np.array(ours(PROMPTS, COMPLETIONS))
  np.testing.assert_allclose(got, expected, atol=1e-4, rtol=1e-4)
  assert np.ptp(expected) > 0.1  # different texts, different rewards: not a constant


def test_reward_model_sits_beside_rule_functions(reward_dir):
  path, model, tokenizer = reward_dir
  funcs = resolve_reward_funcs(f"correctness_reward,reward_model:{path}")
  assert [name for name, _ in funcs] == ["correctness_reward", "reward_model"]
  rewards = compute_rewards(funcs, PROMPTS, COMPLETIONS, {"answer": ["5", "9", "21"]})
  np.testing.assert_array_equal(rewards[:, 0], [1.0, 0.0, 1.0])
  texts, _ = funcs[1][1].texts(PROMPTS, COMPLETIONS)
  np.testing.assert_allclose(rewards[:, 1], hf_rewards(model, tokenizer, texts), atol=1e-4,
                             rtol=1e-4)
