"""models.attention: every kernel computes the causal + key-padding softmax attention a
float64 NumPy transcription computes, in value and gradient; flash keeps a train pass's
memory linear in the sequence length; `resolve` picks per platform."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from grpo_jax.models import ModelConfig, Transformer, attention
from grpo_jax.models.lora import LoraConfig

B, K, G, HD = 3, 2, 3, 16  # 6 query heads over 2 kv heads


def reference(q, k, v, key_mask):
  """Float64 softmax attention, query t over keys s <= t with key_mask[s]; rows with no
  visible key are left at 0 (they are padding: no caller reads them)."""
  q, k, v = (np.asarray(x, np.float64) for x in (q, k, v))
  t = q.shape[3]
  visible = (np.arange(t)[None, :] <= np.arange(t)[:, None])[None] & key_mask[:, None, :]
  scores = np.einsum("bkgtd,bkds->bkgts", q, k) / math.sqrt(q.shape[-1])
  scores = np.where(visible[:, None, None], scores, -np.inf)
  top = np.max(scores, axis=-1, keepdims=True)
  probs = np.exp(scores - np.where(np.isfinite(top), top, 0))
  probs = probs / np.maximum(probs.sum(-1, keepdims=True), 1e-300)
  return np.einsum("bkgts,bksd->bkgtd", probs, v)


def batch(t, seed=0, dtype=jnp.float32):
  """Ragged rows: left padding (a prompt), right padding (a short completion), a full row."""
  rng = np.random.default_rng(seed)
  q = rng.normal(size=(B, K, G, t, HD)) * 2
  k = rng.normal(size=(B, K, HD, t)) * 2
  v = rng.normal(size=(B, K, t, HD))
  pos = np.arange(t)
  key_mask = np.stack([pos >= 5, pos < t - 37, pos >= 0])
  return [jnp.asarray(x, dtype) for x in (q, k, v)] + [jnp.asarray(key_mask)], key_mask


def real_queries(key_mask):
  """[B, 1, 1, T, 1]: the query positions that are real tokens (the rest is padding)."""
  return key_mask[:, None, None, :, None]


KERNELS = {
    "xla": lambda q, k, v, m: attention.causal(q, k, v, m, "xla", jnp.float32),
    "flash": lambda q, k, v, m: attention.causal(q, k, v, m, "flash", jnp.float32),
    "flash, blocks of 32": lambda q, k, v, m: attention.flash(q, k, v, m, jnp.float32, 32),
    # the cuDNN path's own call (layouts, GQA, mask, causality) on XLA's kernel
    "dot_product_attention": lambda q, k, v, m: attention._dot_product(q, k, v, m, "xla"),
}


@pytest.mark.parametrize("t", [7, 128, 300])  # one partial block, one exact, 3 blocks ragged
@pytest.mark.parametrize("name", list(KERNELS))
def test_kernels_equal_the_float64_reference(name, t):
  args, key_mask = batch(t)
  out = np.asarray(jax.jit(KERNELS[name])(*args))
  want = reference(*args[:3], key_mask)
  real = np.broadcast_to(real_queries(key_mask), out.shape)
  np.testing.assert_allclose(out[real], want[real], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("t", [7, 300])
@pytest.mark.parametrize("name", ["flash", "flash, blocks of 32", "dot_product_attention"])
def test_gradients_equal_the_materialised_kernels(name, t):
  """d/d(q, k, v) of a weighted sum over the real query positions: the flash backward pass
  (recomputed blocks) equals autodiff through the materialised scores."""
  args, key_mask = batch(t, seed=1)
  weights = jnp.asarray(np.random.default_rng(2).normal(size=args[0].shape), jnp.float32)
  weights = weights * real_queries(key_mask)

  def loss(fn):
    return jax.jit(jax.grad(lambda q, k, v: jnp.sum(fn(q, k, v, args[3]) * weights),
                            argnums=(0, 1, 2)))(*args[:3])

  got, want = loss(KERNELS[name]), loss(KERNELS["xla"])
  for g, w in zip(got, want):
    scale = float(jnp.abs(w).max())
    np.testing.assert_allclose(np.asarray(g), np.asarray(w), rtol=1e-5, atol=1e-5 * scale)


def test_bfloat16_flash_is_as_close_to_float64_as_the_materialised_kernel():
  args, key_mask = batch(300, seed=3, dtype=jnp.bfloat16)
  want = reference(*(np.asarray(x, np.float32) for x in args[:3]), key_mask)
  real = np.broadcast_to(real_queries(key_mask), want.shape)
  err = {name: np.abs(np.asarray(attention.causal(*args, name, jnp.bfloat16), np.float64)
                      - want)[real].max() for name in ("xla", "flash")}
  # bf16 keeps 8 bits: outputs ~1 are off by ~2^-8 either way
  assert err["flash"] <= max(2 * err["xla"], 2**-7), err


def small_model(attn, **changes):
  cfg = ModelConfig(vocab_size=50, hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2,
                    intermediate_size=64, attention=attn, **changes)
  return Transformer(cfg, nnx.Rngs(0))


@pytest.mark.parametrize("changes", [
    {}, {"qk_norm": True}, {"qkv_bias": True},
    {"lora": LoraConfig(rank=4, alpha=8.0, targets=("q_proj", "k_proj", "v_proj",
                                                    "o_proj"))}])
def test_model_hidden_states_and_gradients_do_not_depend_on_the_kernel(changes):
  """A whole model (Qwen3 q/k norm, Qwen2 biases, LoRA adapters) on a padded batch longer
  than two blocks: hidden states and parameter gradients equal across kernels."""
  t = 2 * attention.ATTENTION_BLOCK + 21
  rng = np.random.default_rng(0)
  ids = jnp.asarray(rng.integers(0, 50, size=(2, t)), jnp.int32)
  mask = jnp.asarray(np.arange(t)[None] >= np.array([0, 9])[:, None], jnp.int32)
  positions = jnp.maximum(jnp.cumsum(mask, axis=1) - 1, 0)
  results = {}
  for attn in ("xla", "flash"):
    graphdef, params = nnx.split(small_model(attn, **changes))
    if "lora" in changes:  # adapters' B starts at zero: make them matter
      params = jax.tree.map(lambda x: x + 0.05, params)

    def loss(params):
      model = nnx.merge(graphdef, params)
      hidden, _ = model.hidden_states(ids, positions, mask)
      return jnp.sum(jnp.where(mask[..., None] > 0, hidden, 0) ** 2), hidden

    (_, hidden), grads = jax.jit(jax.value_and_grad(loss, has_aux=True))(params)
    results[attn] = hidden, grads
  real = np.asarray(mask, bool)
  np.testing.assert_allclose(np.asarray(results["flash"][0])[real],
                             np.asarray(results["xla"][0])[real], rtol=1e-5, atol=1e-5)
  # 1e-5 of the largest gradient: a leaf whose gradient cancels to ~0 (a LoRA A matrix under
  # B's small start) keeps only the rounding of its terms, which are of the largest's size.
  want = jax.tree.leaves(results["xla"][1])
  scale = max(float(jnp.abs(w).max()) for w in want)
  for g, w in zip(jax.tree.leaves(results["flash"][1]), want):
    np.testing.assert_allclose(np.asarray(g), np.asarray(w), rtol=1e-4, atol=1e-5 * scale)


def train_pass_temporaries(attn: str, t: int) -> int:
  """Bytes of temporaries XLA allocates for the gradient of a 2-row, 2-layer model's loss
  over t positions (memory_analysis of the compiled program)."""
  graphdef, params = nnx.split(small_model(attn))
  ids = jax.ShapeDtypeStruct((2, t), jnp.int32)

  def loss(params, ids):
    model = nnx.merge(graphdef, params)
    mask = jnp.ones_like(ids)
    hidden, _ = model.hidden_states(ids, jnp.cumsum(mask, axis=1) - 1, mask)
    return jnp.sum(hidden ** 2)

  compiled = jax.jit(jax.grad(loss)).lower(params, ids).compile()
  return compiled.memory_analysis().temp_size_in_bytes


def test_flash_train_pass_memory_grows_linearly_with_the_sequence():
  flash = {t: train_pass_temporaries("flash", t) for t in (512, 1024, 2048)}
  xla = {t: train_pass_temporaries("xla", t) for t in (512, 1024, 2048)}
  # doubling T: linear memory doubles (plus a constant), the scores quadruple
  assert flash[2048] <= 2.3 * flash[1024] and flash[1024] <= 2.3 * flash[512], flash
  assert xla[2048] >= 3.0 * xla[1024], xla  # the materialised scores: quadratic
  assert flash[2048] * 4 < xla[2048], (flash, xla)


@pytest.mark.parametrize("platform, dtype, want", [
    ("tpu", "float32", "splash"), ("tpu", "bfloat16", "splash"),
    ("gpu", "bfloat16", "cudnn"), ("cuda", "bfloat16", "cudnn"), ("gpu", "float32", "flash"),
    ("cpu", "float32", "auto")])
def test_auto_picks_the_platforms_kernel(platform, dtype, want):
  assert attention.resolve("auto", platform, dtype) == want


def test_cpu_auto_switches_to_flash_for_long_passes():
  assert attention.for_length(attention.CPU_FLASH_FROM - 1) == "xla"
  assert attention.for_length(attention.CPU_FLASH_FROM) == "flash"


@pytest.mark.parametrize("name, platform, dtype, match", [
    ("splash", "cpu", "float32", "TPU only"), ("cudnn", "tpu", "bfloat16", "GPU only"),
    ("cudnn", "gpu", "float32", "bfloat16"), ("fast", "cpu", "float32", "allowed")])
def test_a_kernel_the_platform_lacks_is_refused_in_one_line(name, platform, dtype, match):
  with pytest.raises(ValueError, match=match):
    attention.resolve(name, platform, dtype)
