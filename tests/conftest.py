"""Shared fixtures: 4 fake CPU devices (set before jax is imported) and tiny models."""

import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=4")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import jax  # noqa: E402
import pytest  # noqa: E402
from flax import nnx  # noqa: E402

from grpo_jax.models import ModelConfig, Transformer  # noqa: E402

TINY = ModelConfig(vocab_size=32, hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2,
                   intermediate_size=64, qkv_bias=True)


def tiny_model(seed: int = 0, **changes) -> Transformer:
  """A tiny model whose weights are large enough to give varied, non-trivial outputs.

  (With the usual 0.02 init and tied embeddings a 2-layer model just repeats its input.)
  """
  model = Transformer(TINY.replace(**changes), nnx.Rngs(seed))
  graphdef, params = nnx.split(model)
  leaves, treedef = jax.tree.flatten(params)
  keys = jax.random.split(jax.random.key(seed + 1000), len(leaves))
  leaves = [x + 0.5 * jax.random.normal(k, x.shape) if x.ndim >= 2 else x
            for x, k in zip(leaves, keys)]
  return nnx.merge(graphdef, jax.tree.unflatten(treedef, leaves))


@pytest.fixture
def model():
  return tiny_model()


def pytest_report_header(config):
  return f"jax {jax.__version__}, devices: {jax.device_count()} x {jax.devices()[0].platform}"
