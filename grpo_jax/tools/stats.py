"""What a multi-turn rollout leaves on the host: per-completion tool statistics (the
`tools/` metrics), the environments, and the tool responses, which become TRL's
conversational completions for the reward functions."""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

from grpo_jax import hosts, sampling


class ToolStats(NamedTuple):
  """Per completion: tool calls, failed calls, model turns."""

  calls: np.ndarray
  failures: np.ndarray
  turns: np.ndarray

  def metrics(self, prefix: str = "") -> dict[str, float]:
    """tools/calls_per_completion, tools/failure_rate (failed / all calls; 0 with no call),
    tools/turns (model turns per completion), over every host's completions."""
    total = lambda x: float(hosts.agree(int(np.sum(x))))
    completions, calls = total(np.ones_like(self.calls)), total(self.calls)
    return {f"{prefix}tools/calls_per_completion": calls / max(completions, 1.0),
            f"{prefix}tools/failure_rate": total(self.failures) / max(calls, 1.0),
            f"{prefix}tools/turns": total(self.turns) / max(completions, 1.0)}


def concatenate_tool_stats(stats: list[ToolStats]) -> ToolStats:
  """The stats of several batches (evaluation) or sampling rounds (dynamic sampling)."""
  return ToolStats(*(np.concatenate(parts) for parts in zip(*stats)))


class ToolTurns(NamedTuple):
  """The host side of a multi-turn rollout, per completion: its tool statistics, its
  environment_factory instance (None without), and each tool response's results as
  (tool name, content) pairs, for TRL's conversational completions."""

  stats: ToolStats
  environments: list | None
  results: list[list[list[tuple[str, str]]]]


def tool_conversations(tokenizer, rollout: sampling.Rollout, results) -> list[list[dict]]:
  """Each multi-turn completion as TRL's messages: its model turns (assistant, split where
  tool tokens sit) with the tool messages of each response between them."""
  ids, mask = np.asarray(rollout.completion_ids), np.asarray(rollout.completion_mask) > 0
  tool = np.asarray(rollout.tool_mask) > 0
  conversations = []
  for row, responses in enumerate(results):
    turns, current = [], []
    for position in np.flatnonzero(mask[row]):
      if tool[row, position]:
        if current or not turns:
          turns.append(current)
        current = []
      else:
        current.append(int(ids[row, position]))
    if current or not turns:  # (a completion cut off inside a response ends with it)
      turns.append(current)
    messages = []
    for k, turn in enumerate(turns):
      messages.append({"role": "assistant",
                       "content": tokenizer.decode(turn, skip_special_tokens=True)})
      if k < len(responses):
        messages += [{"role": "tool", "name": name, "content": content}
                     for name, content in responses[k]]
    conversations.append(messages)
  return conversations
