"""make_optimizer: AdamW's weight decay reaches the matrices only, chosen by name."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from grpo_jax import grpo
from grpo_jax.grpo.optimizer import DECAYED_PARAMS, UNDECAYED_PARAMS, param_name
from grpo_jax.models import ModelConfig, Transformer

LR, DECAY = 0.1, 0.5


def params_of(**changes):
  cfg = ModelConfig(vocab_size=32, hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2,
                    intermediate_size=64, qkv_bias=True, qk_norm=True).replace(**changes)
  params = nnx.split(Transformer(cfg, nnx.Rngs(0)))[1]
  # Norm scales start at exactly 1 and biases at 0, where decay-or-not could hide: move
  # every parameter off its init so that any decay would show.
  leaves, treedef = jax.tree.flatten(params)
  keys = jax.random.split(jax.random.key(1), len(leaves))
  return jax.tree.unflatten(treedef, [x + 0.3 + 0.1 * jax.random.normal(k, x.shape)
                                      for x, k in zip(leaves, keys)])


def named_leaves(tree):
  return [(jax.tree_util.keystr(path), param_name(path), leaf)
          for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]]


@pytest.mark.parametrize("tie", [True, False], ids=["tied", "untied"])
@pytest.mark.parametrize("scan_layers", [False, True], ids=["unrolled", "scan"])
def test_zero_gradients_decay_only_the_matrices(scan_layers, tie):
  params = params_of(scan_layers=scan_layers, tie_word_embeddings=tie)
  tx, _ = grpo.make_optimizer(LR, 10, schedule="constant", weight_decay=DECAY)
  zeros = jax.tree.map(jnp.zeros_like, params)
  updates, _ = jax.jit(tx.update)(zeros, tx.init(params), params)
  new = optax.apply_updates(params, updates)
  names = set()
  for (path, name, old), (_, _, after) in zip(named_leaves(params), named_leaves(new)):
    names.add(name)
    old, after = np.asarray(old), np.asarray(after)
    if name in DECAYED_PARAMS:  # AdamW: p - lr * wd * p (Adam's own step is 0 here)
      np.testing.assert_allclose(after, old * (1 - LR * DECAY), rtol=1e-6, err_msg=path)
    else:
      np.testing.assert_array_equal(after, old, err_msg=path)
  # Norm scales are [layers, D] (stacked layers): 2-D, yet not decayed.
  assert {"weight", "bias", "kernel", "embed_tokens"} <= names
  assert ("lm_head" in names) == (not tie)


def test_every_model_parameter_has_a_decay_decision():
  """A new parameter name must be put in DECAYED_PARAMS or UNDECAYED_PARAMS on purpose."""
  params = params_of(tie_word_embeddings=False)
  names = {name for _, name, _ in named_leaves(params)}
  assert names <= set(DECAYED_PARAMS) | set(UNDECAYED_PARAMS), names


def test_no_weight_decay_keeps_the_optimizer_state_layout():
  params = params_of()
  tx, _ = grpo.make_optimizer(LR, 10, weight_decay=0.0)
  unmasked = optax.adamw(optax.constant_schedule(LR), weight_decay=0.0)
  plain = optax.chain(optax.clip_by_global_norm(1.0), unmasked)
  assert jax.tree.structure(tx.init(params)) == jax.tree.structure(plain.init(params))
