"""Held-out evaluation: greedy decoding of every held-out prompt in large batches, scored
by the run's reward functions; `eval/accuracy` is the accuracy reward's mean."""

from __future__ import annotations

import dataclasses
import warnings
from typing import Any, NamedTuple

import jax
import numpy as np

from grpo_jax import sampling
from grpo_jax.rollouts import AbstentionWarnings, HostRollouts
from grpo_jax.tools.stats import concatenate_tool_stats


def greedy_config(cfg: sampling.SamplingConfig) -> sampling.SamplingConfig:
  """The held-out evaluation's decoding: greedy, one completion per prompt."""
  return dataclasses.replace(cfg, greedy=True, num_generations=1)


class EvalResult(NamedTuple):
  metrics: dict[str, float]
  sample_text: str


class Evaluator:
  """Greedy decoding on held-out prompts; `eval/accuracy` is the accuracy reward's mean."""

  def __init__(self, setup: Any, config, layout, sampler, tool_schemas=None):
    """`sampler`: a SingleTurnSampler (or tools.host.ToolSampler) for greedy_config."""
    self.host = HostRollouts(setup.tokenizer, setup.reward_funcs, config, 1, tool_schemas)
    self.layout = layout
    self.sample = sampler
    self.divisor = layout.batch_divisor
    self.data = setup.eval_data
    # All held-out prompts in one batch unless `eval_batch_size` says otherwise: greedy rows
    # are cheap, and the memory plan splits the decoding into chunks when they do not fit
    # (each chunk stops when its own rows have stopped).
    self.batch_size = config.eval_batch_size or len(self.data) or 1
    self.batch_size += -self.batch_size % self.divisor
    names = self.host.names
    self.accuracy_index = (names.index(config.accuracy_reward)
                           if config.accuracy_reward in names else 0)
    self.num_samples = config.num_sample_texts
    self.abstentions = AbstentionWarnings(names, "evaluation rewards", "evaluation",
                                          "held-out completions",
                                          "the eval/ reward metrics are NaN")

  def __call__(self, placed_params) -> EvalResult:
    rewards, texts, prompts, lengths, tool_stats = [], [], [], [], []
    for start in range(0, len(self.data), self.batch_size):
      rows = self.data[start:start + self.batch_size]
      count = len(rows[self.host.prompt_column])
      padded = {k: list(v) + [v[-1]] * (-count % self.divisor) for k, v in rows.items()}
      ids, mask = self.host.encode(padded)
      placed, turns = self.sample(placed_params, ids, mask, jax.random.key(0), padded)
      rollout = self.layout.to_host(placed)
      batch_rewards, completions = self.host.score(padded, rollout, warn_abstentions=False,
                                                   turns=turns)
      if turns is not None:
        tool_stats.append(jax.tree.map(lambda x, n=count: x[:n], turns.stats))
      rewards.append(batch_rewards[:count])
      texts += completions[:count]
      prompts += padded[self.host.prompt_column][:count]
      lengths.append(np.asarray(sampling.model_token_mask(rollout))[:count].sum(-1))
    rewards = np.concatenate(rewards)
    self.abstentions(rewards)
    with warnings.catch_warnings():  # an all-None column: NaN mean, warned about just above
      warnings.simplefilter("ignore", RuntimeWarning)
      means = np.nanmean(rewards, axis=0)
    result = {f"eval/rewards/{name}/mean": float(m) for name, m in zip(self.host.names, means)}
    result["eval/accuracy"] = float(means[self.accuracy_index])
    result["eval/completions/mean_length"] = float(np.mean(np.concatenate(lengths)))
    if tool_stats:
      result.update(concatenate_tool_stats(tool_stats).metrics("eval/"))
    samples = [f"{p!r} -> {c!r} (reward {r})"
               for p, c, r in zip(prompts, texts, rewards[:, self.accuracy_index])]
    return EvalResult(result, "\n\n".join(samples[:self.num_samples]))
