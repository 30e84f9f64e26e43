"""Host side of a rollout: prompts to token ids, completion ids to text, text to rewards.

Reward functions are user Python (TRL's signature), so they run on the host between the
compiled sampler and the compiled update. The held-out evaluation is `evaluate`; what a
multi-turn rollout adds on the host is `tools.stats`.
"""

from __future__ import annotations

import logging

import jax
import numpy as np

from grpo_jax import hosts, sampling
from grpo_jax.data import batching, chat
from grpo_jax.rewards import compute_rewards
from grpo_jax.tools import stats as tool_stats

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
            warn_abstentions: bool = True, turns: tool_stats.ToolTurns | None = None):
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
      for_rewards = tool_stats.tool_conversations(self.tokenizer, rollout, turns.results)
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
    longest = int(hosts.agree(longest, np.max))  # every host must compile the same shape
    width = sampling.trimmed_width(longest, self.bucket, self.max_completion_length)
    if width not in self.seen:
      self.seen.add(width)
      limit = -(-self.max_completion_length // self.bucket) if self.bucket else 1
      log.info("Score and update passes on %d completion positions (longest completion: %d "
               "tokens); compiled widths so far: %s of at most %d", width, longest,
               sorted(self.seen), limit)
    return width


class SingleTurnSampler:
  """One decoding turn per completion, in `layout`'s layout. Called like
  tools.host.ToolSampler: (params, prompt_ids, prompt_mask, rng, rows) -> (placed Rollout,
  ToolTurns or None), None here."""

  def __init__(self, layout, cfg: sampling.SamplingConfig | None = None):
    self.layout = layout
    self.generate = layout.generate if cfg is None else layout.sampler(cfg)

  def __call__(self, params, prompt_ids, prompt_mask, rng, rows):
    del rows  # no environment to reset
    placed = self.generate(params, *self.layout.place_batch((prompt_ids, prompt_mask)), rng)
    return placed, None


