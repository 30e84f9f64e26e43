"""From dataset rows to fixed-shape prompt arrays: tokenize + left-pad, and a resumable stream.

Shapes are fixed (every batch is [B, max_prompt_length]) so the jitted sampler compiles once.
Prompts are left-padded so that every prompt ends at the same column and generation starts
at the same position for the whole batch.
"""

from __future__ import annotations

import logging
from typing import Any

import datasets
import numpy as np

from grpo_jax.errors import UserError


def encode_prompts(tokenizer, prompts: list[str], max_prompt_length: int, *,
                   truncate: bool = False, add_special_tokens: bool = True
                   ) -> tuple[np.ndarray, np.ndarray]:
  """Token ids and attention mask, both int32 [B, max_prompt_length], left-padded.

  Adds only what the tokenizer adds by default (e.g. Llama's BOS). With a chat template the
  caller renders it to text first (`apply_chat_template(..., tokenize=False)`); such
  templates usually contain the BOS already, so pass `add_special_tokens=False` then.
  Too-long prompts are an error unless `truncate`, which keeps their last tokens (the end of
  a prompt, where the question and the generation cue are, matters most).
  """
  if max_prompt_length < 1:
    raise UserError(f"max_prompt_length={max_prompt_length}; must be >= 1")
  pad_id = _pad_id(tokenizer)
  encoded = tokenizer(list(prompts), add_special_tokens=add_special_tokens)["input_ids"]
  ids = np.full((len(encoded), max_prompt_length), pad_id, np.int32)
  mask = np.zeros((len(encoded), max_prompt_length), np.int32)
  truncated = 0
  for row, tokens in enumerate(encoded):
    tokens = _fit(tokens, row, max_prompt_length, truncate)
    truncated += len(tokens) < len(encoded[row])
    if tokens:
      ids[row, -len(tokens):] = tokens
      mask[row, -len(tokens):] = 1
  if truncated:
    logging.warning("truncated %d of %d prompts to their last max_prompt_length=%d tokens",
                    truncated, len(encoded), max_prompt_length)
  return ids, mask


def _pad_id(tokenizer) -> int:
  """The pad id; falls back to EOS (padding is masked out, so any id is correct)."""
  for pad_id in (tokenizer.pad_token_id, tokenizer.eos_token_id):
    if pad_id is not None:
      return int(pad_id)
  raise UserError("tokenizer has neither pad_token nor eos_token; set tokenizer.pad_token")


def _fit(tokens: list[int], row: int, max_prompt_length: int, truncate: bool) -> list[int]:
  if not tokens:
    raise UserError(f"prompt {row} of the batch is empty (0 tokens); every prompt needs text")
  if len(tokens) <= max_prompt_length:
    return tokens
  if not truncate:
    raise UserError(
        f"prompt {row} of the batch has {len(tokens)} tokens, more than "
        f"max_prompt_length={max_prompt_length}; raise max_prompt_length or set "
        "truncate_prompts=True to keep each prompt's last tokens")
  return tokens[-max_prompt_length:]


class PromptStream:
  """Dataset rows in shuffled epochs, `prompts_per_step` (global) rows per step.

  Global position p (prompts consumed so far, over all processes) maps to row
  `permutation(seed, p // N)[p % N]`, so the stream is a pure function of (seed, position):
  a run resumed from `state()` yields exactly the batches it would have, and a batch may
  span the end of one epoch and the start of the next. With several processes, each takes
  its own contiguous slice of every global batch.
  """

  def __init__(self, dataset: datasets.Dataset, prompts_per_step: int, *, seed: int = 0,
               process_index: int = 0, process_count: int = 1):
    if len(dataset) == 0:
      raise UserError("the prompt dataset is empty; PromptStream needs at least one row")
    if prompts_per_step < 1:
      raise UserError(f"prompts_per_step={prompts_per_step}; must be >= 1")
    if process_count < 1 or not 0 <= process_index < process_count:
      raise UserError(f"process_index={process_index}, process_count={process_count}; "
                      "need 0 <= process_index < process_count")
    if prompts_per_step % process_count:
      raise UserError(f"prompts_per_step={prompts_per_step} must be divisible by the number of "
                      f"processes ({process_count}); each process takes an equal share")
    self.dataset = dataset
    self.prompts_per_step = prompts_per_step
    self.seed = seed
    self.process_index = process_index
    self.process_count = process_count
    self.position = 0
    self._permutations: dict[int, np.ndarray] = {}

  @property
  def epoch(self) -> int:
    """Completed passes over the dataset (as a count of the epoch now being read)."""
    return self.position // len(self.dataset)

  def next_batch(self) -> dict[str, list[Any]]:
    """This process's rows of the next global batch, as column -> list."""
    local = self.prompts_per_step // self.process_count
    start = self.position + self.process_index * local
    indices = [self._row(p) for p in range(start, start + local)]
    self.position += self.prompts_per_step
    return self.dataset[indices]

  def state(self) -> dict[str, int]:
    """What a checkpoint must keep to resume the stream (with the same seed and dataset)."""
    return {"position": self.position}

  def restore(self, state: dict[str, Any]) -> None:
    position = int(state["position"])
    if position < 0:
      raise UserError(f"data position {position} in the checkpoint is negative")
    self.position = position

  def _row(self, position: int) -> int:
    epoch, offset = divmod(position, len(self.dataset))
    return int(self._permutation(epoch)[offset])

  def _permutation(self, epoch: int) -> np.ndarray:
    """The epoch's row order; seeded by (seed, epoch) so any epoch is reachable directly."""
    if epoch not in self._permutations:
      if len(self._permutations) > 2:  # a batch touches at most a few epochs
        self._permutations.clear()
      rng = np.random.default_rng([self.seed, epoch])
      self._permutations[epoch] = rng.permutation(len(self.dataset))
    return self._permutations[epoch]
