"""QLoRA's base: int8 and nf4 kernels against NumPy transcriptions of their definitions."""

import jax.numpy as jnp
import numpy as np
import pytest
import qwix

from grpo_jax.models import quantize

# QLoRA (Dettmers et al. 2023), appendix E: the 16 NormalFloat4 levels.
NF4_LEVELS = np.array([-1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
                       -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
                       0.07958029955625534, 0.16093020141124725, 0.24611230194568634,
                       0.33791524171829224, 0.44070982933044434, 0.5626170039176941,
                       0.7229568362236023, 1.0])


def kernel(shape=(2, 128, 24), seed=0):
  """[L, in, out] with columns (and layers) of very different magnitudes: a scale shared
  across columns or layers gives the small ones a far larger error."""
  rng = np.random.default_rng(seed)
  w = rng.normal(size=shape)
  w *= np.logspace(-2, 1, shape[-1])[None, None, :]
  w[-1] *= 100.0
  return w.astype(np.float32)


def nf4_numpy(w, block=64):
  """Each block of `block` input rows of each column (per layer): absmax scale, nearest
  NF4 level of w / absmax, times the absmax."""
  lead, n_in, n_out = w.shape[:-2], w.shape[-2], w.shape[-1]
  blocks = w.reshape(*lead, n_in // block, block, n_out)
  absmax = np.abs(blocks).max(axis=-2, keepdims=True)
  codes = np.abs(blocks[..., None] / absmax[..., None] - NF4_LEVELS).argmin(-1)
  return (NF4_LEVELS[codes] * absmax).reshape(w.shape)


def test_nf4_is_the_nearest_level_of_each_blocks_absmax_scale():
  w = kernel()
  ours = np.asarray(quantize.dequantize(quantize.quantize_kernel(jnp.asarray(w), "nf4"),
                                        jnp.float32))
  np.testing.assert_allclose(ours, nf4_numpy(w), rtol=1e-6, atol=1e-6 * np.abs(w).max())


def test_nf4_dequantisation_equals_qwix_own():
  q = quantize.quantize_kernel(jnp.asarray(kernel()), "nf4")
  np.testing.assert_array_equal(np.asarray(quantize.dequantize(q, jnp.float32)),
                                np.asarray(qwix.dequantize(q)))


def test_int8_error_is_half_a_step_of_each_columns_own_absmax():
  w = kernel()
  ours = np.asarray(quantize.dequantize(quantize.quantize_kernel(jnp.asarray(w), "int8"),
                                        jnp.float32))
  step = np.abs(w).max(axis=-2, keepdims=True) / 127.0  # per layer and output column
  assert (np.abs(ours - w) <= 0.5 * step * (1 + 1e-5) + 1e-9).all()
  # One scale for the whole kernel would be 1000x too coarse for the smallest columns.
  coarse = np.abs(w).max() / 127.0
  assert 0.5 * step.min() < 1e-3 * coarse


def test_each_layer_keeps_its_own_scales():
  w = kernel()
  alone = w.copy()
  alone[-1] = alone[-1] / 100.0  # the last layer no longer 100x larger
  for mode in ("int8", "nf4"):
    a = np.asarray(quantize.dequantize(quantize.quantize_kernel(jnp.asarray(w), mode),
                                       jnp.float32))
    b = np.asarray(quantize.dequantize(quantize.quantize_kernel(jnp.asarray(alone), mode),
                                       jnp.float32))
    np.testing.assert_array_equal(a[0], b[0])


def test_an_input_dimension_that_is_not_a_multiple_of_the_block_is_one_block():
  w = kernel(shape=(1, 40, 8))
  ours = np.asarray(quantize.dequantize(quantize.quantize_kernel(jnp.asarray(w), "nf4"),
                                        jnp.float32))
  np.testing.assert_allclose(ours, nf4_numpy(w, block=40), rtol=1e-6, atol=1e-5)


def test_stored_bytes_count_four_bits_as_half_a_byte():
  w = jnp.asarray(kernel())  # 2 x 128 x 24 = 6144 weights
  assert quantize.stored_bytes(w) == 6144 * 4
  int8 = quantize.quantize_kernel(w, "int8")  # + a float32 scale per layer and column
  assert quantize.stored_bytes(int8) == 6144 + 2 * 24 * 4
  nf4 = quantize.quantize_kernel(w, "nf4")  # + a scale per layer, block of 64 rows, column
  assert quantize.stored_bytes(nf4) == 6144 // 2 + 2 * 2 * 24 * 4
  assert quantize.stored_bytes({"a": jnp.zeros((3,), jnp.bfloat16), "b": jnp.zeros(5, bool)}
                               ) == 6 + 5


def test_unknown_mode_is_an_error():
  with pytest.raises(ValueError, match="base_quantization"):
    quantize.quantize_kernel(jnp.ones((1, 64, 4)), "int4")
  base = {"x": jnp.ones(3)}
  assert quantize.quantize_base(base, "none") is base


def test_quantize_base_touches_the_block_projections_only():
  from flax import nnx

  from conftest import tiny_model
  _, state = nnx.split(tiny_model())
  q = quantize.quantize_base(state, "int8")
  flat = {"/".join(map(str, p)): v.value for p, v in nnx.to_flat_state(q)}
  assert quantize.is_quantized(flat["blocks/self_attn/q_proj/kernel"])
  assert quantize.is_quantized(flat["blocks/mlp/down_proj/kernel"])
  assert not quantize.is_quantized(flat["embed_tokens"])
  assert not quantize.is_quantized(flat["blocks/input_layernorm/weight"])
  assert not quantize.is_quantized(flat["blocks/self_attn/q_proj/bias"])
