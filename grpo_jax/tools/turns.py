"""The host's side of a multi-turn rollout: run the compiled phases, hand each stopped
row's last turn to `respond`, append what it returns, until no row calls a tool.

  begin -> decode -> [respond -> append (in chunks of the append width) -> decode]* -> finish

The device never waits on Python per token: Python runs once per turn, between two
compiled phases, on the rows that stopped. All hosts run the same number of phases (each
is one collective program over all of them).
"""

from __future__ import annotations

from typing import Callable, NamedTuple

import numpy as np

from grpo_jax import hosts, sampling

# respond({row: token ids of its last model turn}, eos [N]) -> {row: response token ids}:
# a row it leaves out (or gives no ids) is finished.
Respond = Callable[[dict[int, np.ndarray], np.ndarray], dict[int, list[int]]]


class TurnCounts(NamedTuple):
  """Per row: model turns, and where each turn began in the completion (for the host)."""

  turns: np.ndarray  # [N] int
  turn_starts: list[list[int]]  # per row, completion index of each model turn's first token


def run_turns(layout, phases: sampling.TurnPhases, params, prompt_ids: np.ndarray,
              prompt_mask: np.ndarray, rng, respond: Respond, max_iterations: int,
              cfg: sampling.SamplingConfig):
  """(placed Rollout with its tool_mask, TurnCounts) of one multi-turn rollout.

  `layout`: the layout (pmap.PmappedStep or mesh.MeshStep: place_batch, to_host);
  `phases`: its `turn_phases(cfg)`. At most `max_iterations` responses per row.
  """
  width, length = sampling.append_width(cfg), cfg.max_completion_length
  state = phases.begin(params, *layout.place_batch((prompt_ids, prompt_mask)))
  rows = prompt_ids.shape[0] * cfg.num_generations
  turn_starts = [[0] for _ in range(rows)]
  for iteration in range(max_iterations + 1):
    state = phases.decode(params, state, rng)
    tokens, used, stopped, eos = layout.to_host(
        (state.tokens, state.length, state.stopped, state.eos))
    if iteration == max_iterations or not hosts.agree(stopped.any(), np.any):
      break  # rows still stopped end where they are
    waiting = {int(r): tokens[r, turn_starts[r][-1]:used[r]] for r in np.flatnonzero(stopped)}
    responses = {r: list(ids) for r, ids in respond(waiting, eos).items()
                 if r in waiting and len(ids)}
    if not hosts.agree(bool(responses), np.any):
      break
    finished = stopped.copy()
    finished[list(responses)] = False
    chunks = hosts.agree(max(-(-len(ids) // width) for ids in responses.values())
                         if responses else 0, np.max)
    for chunk in range(chunks):
      ids = np.full((rows, width), cfg.pad_token_id, np.int32)
      counts = np.zeros(rows, np.int32)
      release = np.zeros(rows, bool)
      for r, response in responses.items():
        part = response[chunk * width:(chunk + 1) * width]
        ids[r, :len(part)], counts[r] = part, len(part)
        release[r] = (chunk + 1) * width >= len(response)
      done_now = finished if chunk == 0 else np.zeros(rows, bool)
      state = phases.append(params, state,
                            *layout.place_batch((ids, counts, release, done_now)))
    for r, response in responses.items():
      start = int(used[r]) + len(response)
      if start < length:
        turn_starts[r].append(start)
  counts = TurnCounts(np.array([len(s) for s in turn_starts]), turn_starts)
  return phases.finish(state), counts
