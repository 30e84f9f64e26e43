"""Host side of a rollout: prompts to token ids, completion ids to text, text to rewards.

Reward functions are user Python (TRL's signature), so they run on the host between the
pmapped sampler and the pmapped update. Also the held-out greedy evaluation.
"""

from __future__ import annotations

import dataclasses
import logging
import warnings
from typing import Any, NamedTuple

import jax
import numpy as np
from jax.experimental import multihost_utils

from grpo_jax import sampling
from grpo_jax.data import batching, chat
from grpo_jax.rewards import compute_rewards

log = logging.getLogger("grpo_jax")


def completion_id_lists(completion_ids, completion_mask) -> list[list[int]]:
  """Each completion's token ids without padding: up to and including its first EOS (the
  mask's extent), all of them for a truncated one. What TRL passes reward functions as
  `completion_ids`."""
  ids = np.asarray(completion_ids)
  mask = np.asarray(completion_mask).astype(bool)
  return [row[m].tolist() for row, m in zip(ids, mask)]


def repeat_columns(rows: dict[str, list], times: int) -> dict[str, list]:
  """Each dataset column with every value repeated `times` (one per completion)."""
  return {k: [v for v in values for _ in range(times)] for k, values in rows.items()}


class AbstentionWarnings:
  """Warns when reward functions return None (not applicable) for a whole batch.

  A function that abstains on every completion of a batch is warned about once per run
  (the first time); a batch where no function applies to any completion (every total
  reward NaN: nothing to learn from) on its 1st, 10th, 100th, ... occurrence, with the
  count, so that a run that keeps hitting it says so without a line per step.
  """

  def __init__(self, names: list[str], where: str, unit: str, completions: str,
               consequence: str):
    self.names, self.where, self.unit = names, where, unit
    self.completions, self.consequence = completions, consequence
    self.warned: set[str] = set()
    self.batches = 0  # checked so far
    self.empty_batches = 0  # of which had no applicable reward at all

  def __call__(self, rewards: np.ndarray) -> None:
    """rewards: [N, F] with NaN for None, one batch (or one whole evaluation)."""
    self.batches += 1
    rewards = np.asarray(rewards)
    n = rewards.shape[0]
    if n == 0:
      return
    abstained = np.all(np.isnan(rewards), axis=0)
    host = " on this host" if jax.process_count() > 1 else ""
    for name, all_none in zip(self.names, abstained):
      if all_none and name not in self.warned:
        self.warned.add(name)
        log.warning("%s: reward function %r returned None (not applicable) for all %d %s%s "
                    "(%s %d of this run), so it contributes nothing there; warned once "
                    "per function", self.where, name, n, self.completions, host, self.unit,
                    self.batches)
    if np.all(abstained):
      self.empty_batches += 1
      if is_power_of_ten(self.empty_batches):
        units = self.unit + ("es" if self.unit.endswith("h") else "s")
        so_far = (f" ({self.empty_batches} such {units} so far, of {self.batches})"
                  if self.empty_batches > 1 else "")
        log.warning("%s: no reward function applied to any completion (all %d %s%s got None "
                    "from every function); %s%s", self.where, n, self.completions, host,
                    self.consequence, so_far)


def across_hosts(value, reduce=np.sum):
  """`reduce` (np.sum, np.max, np.any, np.all) of an integer or boolean over every host: what
  all hosts must agree on (how many sampling rounds or turns to run: each is one collective
  program over all of them). One host: the value itself."""
  if jax.process_count() == 1:
    return reduce(np.asarray(value)).item()
  return reduce(multihost_utils.process_allgather(np.int32(value))).item()


def is_power_of_ten(count: int) -> bool:
  """1, 10, 100, ...: the occurrences a repeated warning is logged on."""
  while count % 10 == 0:
    count //= 10
  return count == 1


class HostRollouts:
  """Encodes prompts and scores completions with the configured reward functions."""

  def __init__(self, tokenizer, reward_funcs, config, num_generations: int,
               tool_schemas: list[dict] | None = None):
    self.tokenizer = tokenizer
    self.tool_schemas = tool_schemas  # shown to the model by the chat template
    self.reward_funcs = reward_funcs
    self.names = [name for name, _ in reward_funcs]
    self.prompt_column = config.prompt_column
    self.max_prompt_length = config.max_prompt_length
    self.truncate = config.truncate_prompts
    self.system_prompt = config.system_prompt
    self.chat_template = config.chat_template
    self.num_generations = num_generations
    self.reward_weights = getattr(config, "reward_weights", None)  # None: all 1
    self.reward_timeout = getattr(config, "reward_timeout_seconds", 0.0)
    self.abstentions = AbstentionWarnings(
        self.names, "step rewards", "batch", "completions of the batch",
        "the update is skipped" if jax.process_count() == 1
        else "the update is skipped if every host has none")

  def encode(self, rows: dict[str, list]):
    texts, add_special_tokens = chat.render_prompts(
        self.tokenizer, list(rows[self.prompt_column]), system_prompt=self.system_prompt,
        mode=self.chat_template, tools=self.tool_schemas)
    return batching.encode_prompts(self.tokenizer, texts, self.max_prompt_length,
                                   truncate=self.truncate, add_special_tokens=add_special_tokens)

  def score(self, rows: dict[str, list], rollout: sampling.Rollout,
            warn_abstentions: bool = True, turns: ToolTurns | None = None):
    """(rewards [N, F] float32 with NaN for None, completion texts) of a host rollout.

    Rewards are finite or NaN (inf, or a weighted total beyond float32, is a UserError).
    `warn_abstentions`: warn (see AbstentionWarnings) when functions return None for the
    whole batch; the evaluator checks its whole evaluation at once instead.
    `turns`: a multi-turn rollout's host record: its environments go to the functions
    that take `environments=`; a completion's ids and plain text hold its tool responses
    too (what the model read), and for chat prompts it is TRL's list of assistant and
    tool messages.
    """
    ids = completion_id_lists(rollout.completion_ids, rollout.completion_mask)
    # The text drops the EOS (a special token); the ids keep it, as TRL's do.
    completions = self.tokenizer.batch_decode(ids, skip_special_tokens=True)
    columns = repeat_columns(rows, self.num_generations)
    prompts = columns.pop(self.prompt_column)
    for_rewards = chat.completions_for_rewards(prompts, completions)
    if turns is not None and prompts and chat.is_conversational(prompts[0]):
      for_rewards = tool_conversations(self.tokenizer, rollout, turns.results)
    rewards = compute_rewards(self.reward_funcs, prompts, for_rewards, columns,
                              self.reward_weights, completion_ids=ids,
                              environments=turns.environments if turns else None,
                              timeout_seconds=self.reward_timeout)
    if warn_abstentions:
      self.abstentions(rewards)
    return rewards, completions

  def named_metrics(self, step_metrics: dict[str, np.ndarray], prefix: str = "") -> dict:
    """Splits the per-function reward vectors into `rewards/<name>/mean|std` scalars."""
    out = {}
    for key, value in step_metrics.items():
      if key.startswith("rewards_per_func/"):
        stat = key.split("/", 1)[1]
        out.update({f"{prefix}rewards/{name}/{stat}": float(v)
                    for name, v in zip(self.names, np.atleast_1d(value))})
      else:
        out[prefix + key] = float(value)
    return out


class TrainWidths:
  """How many completion positions the score and update passes of a batch run on.

  The sampler stops when every row has emitted EOS, but its output is always
  max_completion_length wide; the train passes only need the batch's longest completion
  (rounded up to `bucket`, see `sampling.trimmed_width`). Each new width is a new compiled
  shape of those passes, logged once.
  """

  def __init__(self, bucket: int, max_completion_length: int):
    self.bucket, self.max_completion_length = bucket, max_completion_length
    self.seen: set[int] = set()

  def __call__(self, host_rollout: sampling.Rollout) -> int:
    longest = int(np.max(np.sum(host_rollout.completion_mask, axis=-1)))
    if jax.process_count() > 1:  # every host must compile the same shape
      longest = int(np.max(multihost_utils.process_allgather(np.int32(longest))))
    width = sampling.trimmed_width(longest, self.bucket, self.max_completion_length)
    if width not in self.seen:
      self.seen.add(width)
      limit = -(-self.max_completion_length // self.bucket) if self.bucket else 1
      log.info("Score and update passes on %d completion positions (longest completion: %d "
               "tokens); compiled widths so far: %s of at most %d", width, longest,
               sorted(self.seen), limit)
    return width


def throughput(rollout: sampling.Rollout, seconds: float) -> dict[str, float]:
  tokens = float(np.sum(sampling.model_token_mask(rollout)))  # sampled, not tool tokens
  return {"step_time": seconds, "tokens_per_second": tokens / max(seconds, 1e-9)}


class ToolStats(NamedTuple):
  """Per completion: tool calls, failed calls, model turns."""

  calls: np.ndarray
  failures: np.ndarray
  turns: np.ndarray

  def metrics(self, prefix: str = "") -> dict[str, float]:
    """tools/calls_per_completion, tools/failure_rate (failed / all calls; 0 with no call),
    tools/turns (model turns per completion), over every host's completions."""
    total = lambda x: float(across_hosts(int(np.sum(x))))
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


class SingleTurnSampler:
  """One decoding turn per completion, in `step_fn`'s layout. Called like
  tools.host.ToolSampler: (params, prompt_ids, prompt_mask, rng, rows) -> (placed Rollout,
  ToolTurns or None), None here."""

  def __init__(self, step_fn, cfg: sampling.SamplingConfig | None = None):
    self.step_fn = step_fn
    self.generate = step_fn.generate if cfg is None else step_fn.sampler(cfg)

  def __call__(self, params, prompt_ids, prompt_mask, rng, rows):
    del rows  # no environment to reset
    placed = self.generate(params, *self.step_fn.place_batch((prompt_ids, prompt_mask)), rng)
    return placed, None


def greedy_config(cfg: sampling.SamplingConfig) -> sampling.SamplingConfig:
  """The held-out evaluation's decoding: greedy, one completion per prompt."""
  return dataclasses.replace(cfg, greedy=True, num_generations=1)


class EvalResult(NamedTuple):
  metrics: dict[str, float]
  sample_text: str


class Evaluator:
  """Greedy decoding on held-out prompts; `eval/accuracy` is the accuracy reward's mean."""

  def __init__(self, setup: Any, config, step_fn, sampler, tool_schemas=None):
    """`sampler`: a SingleTurnSampler (or tools.host.ToolSampler) for greedy_config."""
    self.host = HostRollouts(setup.tokenizer, setup.reward_funcs, config, 1, tool_schemas)
    self.step_fn = step_fn
    self.sample = sampler
    self.divisor = step_fn.batch_divisor
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
      rollout = self.step_fn.to_host(placed)
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
