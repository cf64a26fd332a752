"""Frozen kernels in few bits: NF4 codes and statistics equal bitsandbytes', error bounds,
sizes, and trees of quantized kernels."""

import bitsandbytes.functional as bnb
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from lora_jax import quantize as q, quantized_base as qb
from lora_jax.models.llama import Llama, config_for

RNG = np.random.default_rng(0)


def kernel(shape, scale=0.02):
  w = (RNG.standard_normal(shape) * scale).astype(np.float32)
  w[:64, 0] = 0.0                                       # an all-zero block
  return w


def bnb_nf4(w, double):
  """bitsandbytes on the torch weight (out, in), the transpose of the flax kernel (in, out)."""
  return bnb.quantize_4bit(torch.from_numpy(np.ascontiguousarray(w.T)), blocksize=64,
                           quant_type="nf4", compress_statistics=double)


def per_column(x, shape):
  """bitsandbytes' flat (out, ...) statistics in the kernel's axis order (..., out)."""
  return np.asarray(x).reshape(shape[1], -1).T


@pytest.mark.parametrize("shape", [(128, 8), (512, 96), (2048, 256)])
def test_nf4_codes_and_absmax_equal_bitsandbytes(shape):
  w = kernel(shape)
  packed, state = bnb_nf4(w, double=False)
  ours = q.quantize(w, "nf4", double=False)
  np.testing.assert_array_equal(np.asarray(ours.codes), per_column(packed.numpy(), shape))
  np.testing.assert_array_equal(np.asarray(ours.absmax), per_column(state.absmax, shape))
  np.testing.assert_array_equal(np.asarray(ours.dequantize()),
                                bnb.dequantize_4bit(packed, state).numpy().T)


@pytest.mark.parametrize("shape", [(128, 8), (512, 96), (2048, 256)])
def test_double_quantization_matches_bitsandbytes(shape):
  w = kernel(shape)
  packed, state = bnb_nf4(w, double=True)
  ours = q.quantize(w, "nf4")
  # The 8-bit absmax codes are bit-equal; the mean (offset) is a float32 sum of thousands
  # of values whose order torch chooses (by the CPU's vector width), so offset and absmax2
  # agree to a few ulps.
  np.testing.assert_array_equal(np.asarray(ours.absmax), per_column(state.absmax, shape))
  np.testing.assert_allclose(float(ours.offset), float(state.offset), rtol=6e-7)
  np.testing.assert_allclose(np.asarray(ours.absmax2), state.state2.absmax.numpy(), rtol=6e-7)
  theirs = bnb.dequantize_4bit(packed, state).numpy().T
  assert np.abs(np.asarray(ours.dequantize()) - theirs).max() <= 1e-6 * np.abs(w).max()


def test_dynamic_map_and_its_rounding_equal_bitsandbytes():
  theirs = bnb.create_dynamic_map().numpy()
  np.testing.assert_allclose(q.dynamic_map(), theirs, rtol=2e-7, atol=0)
  # The rounding rule alone, on bitsandbytes' own map: the codes of its CPU kernel.
  x = np.abs(RNG.standard_normal((1, 4096)) * 0.3).astype(np.float32)
  codes, absmax2, offset = map(np.asarray, q._double(x, q._lookup_table(theirs)))
  expected, state = bnb.quantize_blockwise(torch.from_numpy(x[0] - offset), blocksize=256)
  np.testing.assert_array_equal(codes[0], expected.numpy())
  np.testing.assert_array_equal(absmax2, state.absmax.numpy())


@pytest.mark.parametrize("fmt, block", [("nf4", 64), ("int4", 64), ("int4", 128), ("int8", None)])
def test_error_is_within_half_a_step(fmt, block):
  w = kernel((256, 32))
  k = q.quantize(w, fmt, block=block, double=False)
  err = np.abs(np.asarray(k.dequantize()) - w)
  if fmt == "int8":
    bound = np.abs(w).max(axis=0, keepdims=True) / 127 / 2
  else:
    step = np.max(np.diff(q.NF4_LEVELS)) if fmt == "nf4" else 1 / 7
    absmax = np.abs(w.reshape(-1, block, 32)).max(axis=1, keepdims=True)
    bound = np.broadcast_to(absmax * step / 2, (256 // block, block, 32)).reshape(256, 32)
  assert (err <= bound * (1 + 1e-6) + 1e-12).all()
  assert err.max() > 0                                   # it is lossy: the bound is not vacuous


def test_sizes_are_as_computed():
  n_in, n_out = 4096, 1024
  w = np.zeros((n_in, n_out), np.float32)
  n = n_in * n_out
  double = q.quantize(w, "nf4")
  assert double.nbytes == n // 2 + n // 64 + 4 * (n // 64 // 256) + 4
  assert round(double.bits_per_weight, 4) == 4.127
  assert q.quantize(w, "nf4", double=False).nbytes == n // 2 + 4 * (n // 64)
  assert q.quantize(w, "int8").nbytes == n + 4 * n_out
  assert q.quantize(w, "int4", block=128).nbytes == n // 2 + 4 * (n // 128)


def test_stacked_kernels_quantize_layer_by_layer_and_dequantize_under_jit():
  stacked = np.stack([kernel((128, 16)), kernel((128, 16), 0.5)])
  whole = q.quantize(stacked, "nf4")
  for i in range(2):
    alone = q.quantize(stacked[i], "nf4")
    np.testing.assert_array_equal(np.asarray(whole.codes[i]), np.asarray(alone.codes))
    np.testing.assert_array_equal(np.asarray(whole.absmax[i]), np.asarray(alone.absmax))
  dense = jax.jit(lambda k: k.dequantize(jnp.bfloat16))(whole)
  assert dense.shape == stacked.shape and dense.dtype == jnp.bfloat16
  np.testing.assert_array_equal(np.asarray(dense), np.asarray(whole.dequantize(jnp.bfloat16)))


def test_quantize_params_takes_the_linear_kernels_but_the_head():
  model = Llama(config_for("tiny", vocab_size=320))
  params = model.init(jax.random.key(0), jnp.zeros((1, 4), jnp.int32))["params"]
  quantized = qb.quantize_params(params, "nf4")
  flat = jax.tree_util.tree_leaves_with_path(nn_unbox(quantized), is_leaf=q.is_quantized)
  kinds = {"/".join(k.key for k in kp): type(x).__name__ for kp, x in flat}
  assert kinds["layers_0/self_attn/q_proj/kernel"] == "QuantizedKernel"
  assert kinds["lm_head/kernel"] != "QuantizedKernel"
  assert kinds["embed_tokens/embedding"] != "QuantizedKernel"
  back = qb.dequantize_params(quantized)
  assert jax.tree.structure(back) == jax.tree.structure(jax.tree.map(np.asarray,
                                                                      nn_unbox(params)))
  some = nn_unbox(qb.quantize_params(params, "int8", targets=["q_proj"]))
  assert q.is_quantized(some["layers_1"]["self_attn"]["q_proj"]["kernel"])
  assert not q.is_quantized(some["layers_1"]["self_attn"]["k_proj"]["kernel"])


def test_models_with_tied_embeddings_quantize_by_default():
  """Their head is the embedding: the default exclusion of `lm_head` has nothing to match."""
  model = Llama(config_for("tiny", vocab_size=320, tie_word_embeddings=True))
  params = model.init(jax.random.key(0), jnp.zeros((1, 4), jnp.int32))["params"]
  assert "lm_head" not in params
  quantized = nn_unbox(qb.quantize_params(params, "nf4"))
  assert q.is_quantized(quantized["layers_0"]["mlp"]["down_proj"]["kernel"])
  with pytest.raises(ValueError, match="exclude rule 'lm_head' matches no kernel"):
    qb.quantize_params(params, "nf4", exclude=["lm_head", "q_proj"])


def nn_unbox(tree):
  import flax.linen as nn
  return nn.unbox(tree)


def test_bad_input_is_named():
  w = kernel((96, 8))
  with pytest.raises(ValueError, match="unknown quantization format 'fp8'"):
    q.quantize(w, "fp8")
  with pytest.raises(ValueError, match="a block of 64 weights does not divide its input axis of 96"):
    q.quantize(w, "nf4")
  with pytest.raises(ValueError, match="already quantized"):
    q.quantize(q.quantize(w, "nf4", block=32), "nf4")
  with pytest.raises(ValueError, match="only kernels of 2 or more axes"):
    q.quantize(np.ones(64, np.float32), "nf4")
  params = {"dense": {"kernel": kernel((128, 8))}}
  with pytest.raises(ValueError, match="already quantized"):
    qb.quantize_params(qb.quantize_params(params, exclude=()), exclude=())
  with pytest.raises(ValueError, match="target 'v_proj' matches no kernel"):
    qb.quantize_params(params, targets=["v_proj"], exclude=())
