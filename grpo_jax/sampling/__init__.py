"""Sampling: single-turn decoding (`decode`) and multi-turn continuation (`multi_turn`).

Pure: arrays in, arrays out, everything per token inside `jax.jit` / `pmap`. The host side
of a tool-calling rollout (parsing calls, running tools, rendering their responses) lives
in `grpo_jax.tools`; it drives `multi_turn` between decoding phases.
"""

from grpo_jax.sampling.decode import (Rollout, SamplingConfig, filter_logits, generate,
                                      model_token_mask, sample_inverse_cdf, trim_completions,
                                      trimmed_width)
from grpo_jax.sampling.multi_turn import (TurnPhases, TurnState, append_turn, append_width,
                                          begin_turns, decode_turn, finish_turns)

__all__ = ["Rollout", "SamplingConfig", "filter_logits", "generate", "model_token_mask",
           "sample_inverse_cdf", "trim_completions", "trimmed_width", "TurnPhases", "TurnState",
           "append_turn", "append_width", "begin_turns", "decode_turn", "finish_turns"]
