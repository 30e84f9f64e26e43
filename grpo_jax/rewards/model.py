"""A frozen neural reward model, usable in `reward_funcs` beside rule functions.

`reward_model:PATH` loads a Hugging Face *ForSequenceClassification checkpoint (Qwen2,
Llama, Qwen3 layout: the decoder plus a linear `score` head). The reward of a completion
is the head's first output at the last token of prompt + completion, as in
transformers. Scoring is one jit-compiled function; sequences are left-padded to a few
bucketed lengths so it compiles at most once per bucket.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from grpo_jax.data import batching, chat
from grpo_jax.errors import UserError
from grpo_jax.models import hf, positions_from_mask
from grpo_jax.rewards.text import completion_text

SPEC_PREFIX = "reward_model:"


@functools.partial(jax.jit, static_argnums=0)
def score_sequences(model_def, params, score, input_ids, mask) -> jax.Array:
  """[B] rewards: score-head output 0 at the last position of left-padded sequences."""
  model = nnx.merge(model_def, params)
  hidden, _ = model.hidden_states(input_ids, positions_from_mask(mask), mask)
  return jnp.einsum("bd,ld->bl", hidden[:, -1].astype(jnp.float32),
                    score.astype(jnp.float32))[:, 0]


def _bucket(length: int, max_length: int) -> int:
  return min(max_length, max(32, 1 << (length - 1).bit_length()))


class RewardModel:
  """Callable with TRL's reward signature: `(prompts, completions, **columns) -> [float]`."""

  __name__ = "reward_model"

  def __init__(self, path: str, dtype: str = "float32", max_length: int = 2048,
               batch_size: int = 16):
    backbone, self.score, self.tokenizer = hf.sequence_classifier_from_pretrained(path, dtype)
    if self.tokenizer is None:
      raise UserError(f"reward model {path} has no tokenizer files")
    self.model_def, self.params = nnx.split(backbone)
    self.max_length, self.batch_size = max_length, batch_size

  def texts(self, prompts, completions) -> tuple[list[str], bool]:
    """prompt + completion as the reward model reads them (its chat template if chat),
    and whether the tokenizer should add its special tokens."""
    if prompts and chat.is_conversational(prompts[0]):
      return [self.tokenizer.apply_chat_template(list(p) + list(c), tokenize=False)
              for p, c in zip(prompts, completions)], False
    return [str(p) + completion_text(c) for p, c in zip(prompts, completions)], True

  def __call__(self, prompts, completions, **columns) -> list[float]:
    texts, add_special_tokens = self.texts(prompts, completions)
    rewards = []
    for start in range(0, len(texts), self.batch_size):
      ids, mask = batching.encode_prompts(
          self.tokenizer, texts[start:start + self.batch_size], self.max_length,
          truncate=True, add_special_tokens=add_special_tokens)
      width = _bucket(int(mask.sum(-1).max()), self.max_length)  # drop all-padding columns
      rewards.append(np.asarray(score_sequences(self.model_def, self.params, self.score,
                                                ids[:, -width:], mask[:, -width:])))
    return [float(r) for r in np.concatenate(rewards)]
