"""GRPO as pure functions: advantages, per-token log-probs, the loss, and the train step.

Everything here is arrays in, arrays out, and runs under `jax.jit` / `jax.pmap`. Under
pmap each device holds whole groups of G completions; functions that need global
statistics take `axis_name` and reduce over it (None: a single device, no collectives).

Loss normalisation is written so that the *sum over devices* of each device's share is
the loss of the whole global batch; gradients are therefore `psum`-reduced and the
result does not depend on how many devices the batch is split over (except for
`loss_type="bnpo"`, which by definition normalises per device, as TRL does per process).

The package's rooms, in the order the data flows: `types` (GRPOConfig, TrainState),
`advantages` (and the reward metrics), `logprobs`, `loss`, `optimizer`, `step` (scoring,
update, GRPOStep).
"""

from grpo_jax.grpo.advantages import (Advantages, combine_rewards, group_advantages,
                                      reward_metrics)
from grpo_jax.grpo.logprobs import (LOGITS_CHUNK_BYTES, completion_logprobs, token_logprobs,
                                    vocab_chunk_size)
from grpo_jax.grpo.loss import (TOKEN_METRICS, LossNormalizers, ScoredRollout, aggregate_loss,
                                grpo_loss, loss_normalizers, per_token_loss)
from grpo_jax.grpo.optimizer import make_optimizer
from grpo_jax.grpo.reference import mix_reference, sync_due
from grpo_jax.grpo.step import (GRPOStep, RewardFn, as_reference, init_train_state, join_rows,
                                loss_and_grads, micro_batch_rows, policy_params, dropout_key,
                                score_rollout, split_rows, update)
from grpo_jax.grpo.types import LOSS_TYPES, SCALE_REWARDS, STD_EPS, GRPOConfig, TrainState

__all__ = ["Advantages", "combine_rewards", "group_advantages", "LOGITS_CHUNK_BYTES",
           "completion_logprobs", "token_logprobs", "vocab_chunk_size", "TOKEN_METRICS",
           "LossNormalizers", "ScoredRollout", "aggregate_loss", "grpo_loss", "loss_normalizers",
           "per_token_loss", "GRPOStep", "split_rows", "join_rows",
           "RewardFn", "as_reference", "init_train_state", "loss_and_grads", "make_optimizer",
           "micro_batch_rows", "reward_metrics", "score_rollout", "update", "policy_params",
           "dropout_key", "LOSS_TYPES",
           "SCALE_REWARDS", "STD_EPS", "GRPOConfig", "TrainState", "mix_reference", "sync_due"]
