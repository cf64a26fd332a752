"""LoftQ: a quantized base and adapters whose sum approximates the float kernels better than
the quantized base alone, at the adapter's own scale; a model that starts closer to the float
model."""

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import lora_jax as lj
from lora_jax import bases, loftq as lq, quantize as q, quantized_base as qb
from lora_jax.models.llama import Llama, config_for
from lora_jax.recipe import ModelSection

IDS = jax.random.randint(jax.random.key(1), (2, 8), 0, 320)


@pytest.fixture(scope="module")
def shipped_kernel():
  """A real kernel: the shipped model's layer-0 up projection, (128, 384)."""
  _, params = bases.resolve(ModelSection(base="builtin:tiny-kjv")).load()
  return np.asarray(nn.unbox(params)["layers_0"]["mlp"]["up_proj"]["kernel"])


def test_loftq_lowers_the_approximation_error_of_a_real_kernel(shipped_kernel):
  w = shipped_kernel
  before = lq.relative_error(w, q.quantize(w, "nf4"))
  errors = []
  for iters in (1, 3):
    base, a, b = lq.loftq(w, 16, scale=2.0, iters=iters)
    errors.append(lq.relative_error(w, base, a, b, scale=2.0))
  assert errors[0] < 0.9 * before and errors[1] < errors[0]   # 0.0928 -> 0.0793 -> 0.071


def test_the_adapter_scale_is_divided_out(shipped_kernel):
  w = shipped_kernel[:, :64]
  _, a1, b1 = lq.loftq(w, 8, scale=1.0)
  _, a4, b4 = lq.loftq(w, 8, scale=4.0)
  np.testing.assert_allclose(4.0 * a4 @ b4, a1 @ b1, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("scan", [False, True])
def test_a_loftq_start_is_closer_to_the_float_model(scan):
  config = dataclasses.replace(config_for("tiny", vocab_size=320), scan_layers=scan)
  llama = Llama(config)
  base = llama.init(jax.random.key(0), IDS)["params"]
  lora = lj.LoRAConfig(rank=8, alpha=16, targets="all-linear")
  model = lj.inject(llama, lora)
  fresh = lj.init_adapters(model, base, jax.random.key(2), IDS)
  started = lq.loftq_params(fresh, lora, "nf4", iters=2)
  plain = lj.init_adapters(model, qb.quantize_params(base, "nf4"), jax.random.key(2), IDS)
  reference = llama.apply({"params": base}, IDS)
  gap = lambda p: float(jnp.abs(model.apply({"params": p}, IDS) - reference).mean())
  assert gap(started) < 0.8 * gap(plain)
  kernel = nn.unbox(started)["layers" if scan else "layers_0"]["mlp"]["up_proj"]["kernel"]
  assert q.is_quantized(kernel) and not q.is_quantized(nn.unbox(started)["lm_head"]["kernel"])
  assert q.is_quantized(nn.unbox(started)["layers" if scan else "layers_1"]["self_attn"]
                        ["o_proj"]["kernel"])


def test_loftq_refuses_what_it_cannot_start():
  llama = Llama(config_for("tiny", vocab_size=320))
  base = llama.init(jax.random.key(0), IDS)["params"]
  dora = lj.LoRAConfig(rank=4, alpha=8, targets=["q_proj"], use_dora=True)
  with pytest.raises(ValueError, match="DoRA adapters are not supported"):
    lq.loftq_params(lj.init_adapters(lj.inject(llama, dora), base, jax.random.key(1), IDS), dora)
  with pytest.raises(ValueError, match="hold no adapters"):
    lq.loftq_params(base, lj.LoRAConfig(rank=4, alpha=8))
  with pytest.raises(ValueError, match="iters=0"):
    lq.loftq(np.ones((64, 8), np.float32), 2, iters=0)
