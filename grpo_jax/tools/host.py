"""A multi-turn rollout with tools, as the loop and the evaluator use it: the compiled
phases (tools.turns), and between them the host's part of each turn: read the calls of the
rows that stopped, run them (each completion with its own tools and environment), render
the responses with the chat template.
"""

from __future__ import annotations

import logging
from typing import Any, NamedTuple

import numpy as np

from grpo_jax import sampling
from grpo_jax.errors import UserError
from grpo_jax.tools import calls as calls_lib
from grpo_jax.tools import registry, turns
from grpo_jax.tools import stats as tool_stats
from grpo_jax.tools.render import ResponseRenderer

log = logging.getLogger("grpo_jax")


def uses_tools(config) -> bool:
  return bool(str(config.tools).strip() or str(config.environment_factory).strip())


class ToolSetup(NamedTuple):
  """What a run's tool config resolves to, built once and shared by sampler and prompts."""

  tools: list[registry.Tool]
  environments: registry.Environments | None
  schemas: list[dict]
  parse: Any
  stop_token_ids: tuple[int, ...]


def tool_setup(config, tokenizer) -> ToolSetup | None:
  """The run's tools (None without `tools` / `environment_factory`); checks the config."""
  if not uses_tools(config):
    return None
  tools = registry.load_tools(config.tools)
  environments = (registry.Environments(config.environment_factory)
                  if str(config.environment_factory).strip() else None)
  schemas = registry.tool_schemas(tools, environments)
  template = getattr(tokenizer, "chat_template", None)
  if template is None:
    raise UserError("config.tools / environment_factory need a tokenizer with a chat "
                    "template: it shows the model the tools and renders their responses")
  if config.chat_template != "auto":
    raise UserError("config.tools / environment_factory need chat_template='auto'")
  parse = calls_lib.parser_for(config.tool_call_format, template)
  tag = calls_lib.close_tag(config.tool_call_format, template)
  stop = ()
  if tag:
    ids = tokenizer(tag, add_special_tokens=False)["input_ids"]
    if len(ids) == 1 and ids[0] != tokenizer.unk_token_id:
      stop = (int(ids[0]),)  # decoding pauses right at the call's end
  return ToolSetup(tools, environments, schemas, parse, stop)


class ToolSampler:
  """Samples multi-turn rollouts for one SamplingConfig (training's, or greedy evaluation's)
  in one layout (`layout`)."""

  def __init__(self, setup: ToolSetup, tokenizer, layout, cfg: sampling.SamplingConfig,
               max_iterations: int, timeout_seconds: float):
    self.setup, self.tokenizer, self.layout, self.cfg = setup, tokenizer, layout, cfg
    self.max_iterations = max_iterations
    self.phases = layout.turn_phases(cfg)
    self.render = ResponseRenderer(tokenizer, setup.schemas)
    self.runner = calls_lib.ToolRunner(timeout_seconds)
    self.plain = {t.name: t.function for t in setup.tools}

  def __call__(self, params, prompt_ids, prompt_mask, rng, rows: dict[str, list]):
    """(placed Rollout, tool_stats.ToolTurns) for this host's prompts; `rows`: their dataset
    columns (an environment's reset(**row) gets its completion's)."""
    group = self.cfg.num_generations
    count = prompt_ids.shape[0] * group
    per_completion = [{k: v[i // group] for k, v in rows.items()} for i in range(count)]
    envs = (self.setup.environments.start(per_completion) if self.setup.environments
            else None)
    toolsets = [{**self.plain, **(self.setup.environments.tools_of(envs[i]) if envs else {})}
                for i in range(count)]
    calls, failures = np.zeros(count, np.int64), np.zeros(count, np.int64)
    results: list[list[list[tuple[str, str]]]] = [[] for _ in range(count)]

    def respond(waiting: dict[int, np.ndarray], eos: np.ndarray) -> dict[int, list[int]]:
      parsed = {r: self.setup.parse(self.tokenizer.decode(ids.tolist(),
                                                          skip_special_tokens=False))
                for r, ids in waiting.items()}
      parsed = {r: found for r, found in parsed.items() if found}
      jobs = [(call, toolsets[r]) for r, found in parsed.items() for call in found]
      answers = iter(self.runner.run(jobs))
      out = {}
      for r, found in parsed.items():
        mine = [next(answers) for _ in found]
        calls[r] += len(mine)
        failures[r] += sum(res.failed for res in mine)
        results[r].append([(res.name, res.content) for res in mine])
        out[r] = self.render(mine, after_eos=bool(eos[r]))
      return out

    placed, counts = turns.run_turns(self.layout, self.phases, params, prompt_ids,
                                     prompt_mask, rng, respond, self.max_iterations, self.cfg)
    return placed, tool_stats.ToolTurns(tool_stats.ToolStats(calls, failures, counts.turns), envs,
                                      results)
