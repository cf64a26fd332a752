"""Adapter stacks: mixed batches equal per-example runs, hot swaps reuse the compiled
program, padding is exact, K adapters train in one step as in K runs."""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import lora_jax as lj
from lora_jax import sharding, train
from lora_jax.models.llama import Llama, config_for, generate


class Block(nn.Module):
  """Dense, DenseGeneral (two feature axes) and Einsum (kernel axes out of order)."""

  @nn.compact
  def __call__(self, x):
    h = nn.Dense(12, name="up")(x)
    h = nn.DenseGeneral((2, 6), name="heads")(jnp.tanh(h))
    return nn.Einsum((6, 2, 5), "bthd,dho->bto", name="out")(h)


X = jax.random.normal(jax.random.key(1), (5, 3, 7))


def _trained(model, config, base, seed, *args, noise=0.2):
  """Fresh adapters of `config`, moved off their init as training would."""
  params = lj.init_adapters(lj.inject(model, config), base, jax.random.key(seed), *args)
  adapters = lj.split(params)[0]
  keys = iter(jax.random.split(jax.random.key(seed + 100), 64))
  return jax.tree.map(lambda a: a + noise * jax.random.normal(next(keys), a.shape, a.dtype),
                      adapters), config


@functools.cache
def block_adapters():
  model = Block()
  base = model.init(jax.random.key(0), X)["params"]
  adapters = {
      "plain": _trained(model, lj.LoRAConfig(rank=2, alpha=3.0), base, 1, X),
      "rs": _trained(model, lj.LoRAConfig(rank=4, alpha=2.0, use_rslora=True,
                                          targets=["heads", "out"]), base, 2, X),
      "dora": _trained(model, lj.LoRAConfig(rank=3, use_dora=True, targets=["up", "out"],
                                            rank_pattern={"out": 1}), base, 3, X),
  }
  return model, base, adapters


def _alone(model, base, adapters, name, x):
  """The reference: one example through the model with its adapter alone (or the base)."""
  if name is None:
    return model.apply({"params": base}, x)
  tree, config = adapters[name]
  return lj.inject(model, config).apply({"params": lj.combine(tree, base)}, x)


def test_mixed_batch_equals_each_example_alone_every_layer_kind_with_dora():
  model, base, adapters = block_adapters()
  s = lj.stack_adapters(model, adapters, X, max_rank=6)
  names = ["plain", "rs", None, "dora", "plain"]
  y = lj.inject(model, s.spec).apply({"params": lj.combine(s.params, base)}, X,
                                     adapter_ids=s.ids(names))
  for i, name in enumerate(names):
    ref = _alone(model, base, adapters, name, X[i:i + 1])
    np.testing.assert_allclose(y[i:i + 1], ref, rtol=1e-6, atol=1e-6 * float(jnp.abs(ref).max()))
  # The adapters differ: a mix that ignored the ids would fail above.
  outs = [_alone(model, base, adapters, n, X[:1]) for n in ("plain", "rs", "dora", None)]
  assert all(float(jnp.abs(a - b).max()) > 1e-3 for a, b in zip(outs, outs[1:]))


def test_a_member_comes_back_exactly_and_the_base_is_untouched():
  model, base, adapters = block_adapters()
  before = jax.tree.map(np.array, base)
  s = lj.stack_adapters(model, adapters, X, max_rank=6, count=4)
  assert s.names == ("plain", "rs", "dora", None)
  for name, (tree, config) in adapters.items():
    got, got_config = s.adapter(name)
    assert got_config == config
    assert jax.tree.structure(got) == jax.tree.structure(tree)
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(tree)):
      np.testing.assert_array_equal(a, b)
  y = lj.inject(model, s.spec).apply({"params": lj.combine(s.params, base)}, X,
                                     adapter_ids=s.ids(["plain"] * 5))
  del y
  for a, b in zip(jax.tree.leaves(base), jax.tree.leaves(before)):
    np.testing.assert_array_equal(a, b)


def test_padding_is_exact_and_scale_stays_the_adapters_own():
  """Rank 2 in a rank-8 stack gives the rank-2 adapter's output: its alpha/r, not alpha/8."""
  model, base, adapters = block_adapters()
  tight = lj.stack_adapters(model, {"plain": adapters["plain"]}, X)
  padded = lj.stack_adapters(model, {"plain": adapters["plain"]}, X, max_rank=8)
  assert tight.spec.max_rank == 2 and padded.spec.max_rank == 8
  run = lambda s: lj.inject(model, s.spec).apply({"params": lj.combine(s.params, base)}, X)
  ref = _alone(model, base, adapters, "plain", X)
  np.testing.assert_allclose(run(padded), ref, rtol=1e-6, atol=1e-6)
  np.testing.assert_allclose(run(tight), ref, rtol=1e-6, atol=1e-6)


def test_hot_swap_reuses_the_compiled_program():
  model, base, adapters = block_adapters()
  s = lj.stack_adapters(model, {"a": adapters["plain"], "b": adapters["rs"]}, X, max_rank=4, use_dora=True)
  mixed = lj.inject(model, s.spec)
  forward = jax.jit(lambda params, x, ids: mixed.apply({"params": params}, x, adapter_ids=ids))
  ids = s.ids(["a", "b", "a", None, "b"])
  forward(lj.combine(s.params, base), X, ids)
  # Swap slot 'a' for the DoRA adapter (another rank, alpha, targets), 'b' for a rank-1 one.
  tiny = _trained(model, lj.LoRAConfig(rank=1, alpha=7.0), base, 9, X)
  swapped = s.swap("a", *adapters["dora"], name="dora").swap("b", *tiny, name="tiny")
  names = ["dora", "tiny", "dora", None, "tiny"]
  y = forward(lj.combine(swapped.params, base), X, swapped.ids(names))
  assert forward._cache_size() == 1
  for i, name in enumerate(names):
    ref = _alone(model, base, {**adapters, "tiny": tiny}, name, X[i:i + 1])
    np.testing.assert_allclose(y[i:i + 1], ref, rtol=1e-6, atol=1e-6)
  assert s.names == ("a", "b")  # the original stack is unchanged


def test_bad_inputs_are_refused_naming_the_problem():
  model, base, adapters = block_adapters()
  s = lj.stack_adapters(model, adapters, X, max_rank=4)
  mixed = lj.inject(model, s.spec)
  params = lj.combine(s.params, base)
  with pytest.raises(ValueError, match="no adapter named 'nope'.*plain"):
    s.ids(["nope"])
  with pytest.raises(ValueError, match="adapter id 3 is out of range.*3 adapters"):
    mixed.apply({"params": params}, X, adapter_ids=jnp.array([0, 1, 2, 3, 0]))
  with pytest.raises(ValueError, match="4 ids for a batch of 5|4 ids but layer"):
    mixed.apply({"params": params}, X, adapter_ids=jnp.array([0, 1, 2, 0]))
  with pytest.raises(ValueError, match="pass adapter_ids"):
    mixed.apply({"params": params}, X)
  with pytest.raises(ValueError, match="adapter_ids is an argument of a model injected with a "
                     "StackSpec"):
    lj.inject(model, adapters["plain"][1]).apply(
        {"params": lj.combine(adapters["plain"][0], base)}, X, adapter_ids=jnp.zeros(5, int))
  with pytest.raises(ValueError, match=r"rank 6 at '\w+', above the stack's max_rank 4"):
    s.swap("plain", *_trained(model, lj.LoRAConfig(rank=6), base, 4, X))
  with pytest.raises(ValueError, match="rank 4 at .*above the stack's max_rank 2"):
    lj.stack_adapters(model, adapters, X, max_rank=2)
  with pytest.raises(ValueError, match="is DoRA but the stack holds no DoRA"):
    lj.stack_adapters(model, adapters, X, use_dora=False)
  with pytest.raises(ValueError, match="named 'rs' in slot 1 already"):
    s.swap("plain", *adapters["plain"], name="rs")
  with pytest.raises(ValueError, match="reserved for the base model"):
    lj.stack_adapters(model, {"__base__": adapters["plain"]}, X)
  with pytest.raises(ValueError, match="count=2: must be an integer >= the 3 adapters"):
    lj.stack_adapters(model, adapters, X, count=2)
  narrow = jax.tree.map(lambda a: a[..., :1, :] if a.ndim == 2 else a, adapters["plain"][0])
  with pytest.raises(ValueError, match="does not fit the model's layer"):
    s.swap("plain", narrow, adapters["plain"][1])
  # Out-of-range ids in a trace poison their rows instead of reading another adapter.
  y = jax.jit(lambda ids: mixed.apply({"params": params}, X, adapter_ids=ids))(
      jnp.array([0, 7, 1, -1, -5]))
  assert np.isnan(y[1]).all() and np.isnan(y[4]).all() and np.isfinite(y[np.array([0, 2, 3])]).all()


@functools.cache
def llama_stack(scan: bool):
  llama = Llama(config_for("tiny", scan_layers=scan))
  prompt = jnp.asarray(np.random.default_rng(0).integers(0, 256, (4, 6)), jnp.int32)
  base = nn.unbox(llama.init(jax.random.key(0), prompt)["params"])
  adapters = {
      "a": _trained(llama, lj.LoRAConfig(rank=4, alpha=16.0, targets=["q_proj", "v_proj"]),
                    base, 1, prompt, noise=0.05),
      # Small moves: every layer of the model adapted strongly is ill-conditioned enough
      # that its own batch-of-1 and batch-of-8 logits differ by 5e-5.
      "b": _trained(llama, lj.LoRAConfig(rank=2, use_rslora=True), base, 2, prompt, noise=0.05),
      "c": _trained(llama, lj.LoRAConfig(rank=2, use_dora=True, targets=["o_proj", "down_proj"]),
                    base, 3, prompt, noise=0.05),
  }
  return llama, base, adapters, prompt, lj.stack_adapters(llama, adapters, prompt)


@pytest.mark.parametrize("scan", [False, True], ids=["unscanned", "scanned"])
def test_llama_mixed_logits_equal_each_row_alone(scan):
  llama, base, adapters, prompt, s = llama_stack(scan)
  names = ["a", None, "c", "b"]
  mixed = lj.inject(llama, s.spec)
  logits = mixed.apply({"params": lj.combine(s.params, base)}, prompt, adapter_ids=s.ids(names))
  for i, name in enumerate(names):
    model, params = _single(llama, base, adapters, name)
    np.testing.assert_allclose(logits[i:i + 1], model.apply({"params": params}, prompt[i:i + 1]),
                               rtol=1e-5, atol=1e-5)


def _single(llama, base, adapters, name):
  if name is None:
    return llama, base
  return lj.inject(llama, adapters[name][1]), lj.combine(adapters[name][0], base)


def test_llama_mixed_generate_equals_each_row_alone():
  llama, base, adapters, prompt, s = llama_stack(True)
  names = ["a", None, "c", "b"]
  out = generate(lj.inject(llama, s.spec), lj.combine(s.params, base), prompt, max_new_tokens=4,
                 model_kwargs={"adapter_ids": s.ids(names)})
  for i, name in enumerate(names):
    model, params = _single(llama, base, adapters, name)
    np.testing.assert_array_equal(out[i:i + 1], generate(model, params, prompt[i:i + 1],
                                                         max_new_tokens=4))
  # The adapters change the continuation (else equal rows would prove nothing).
  assert len({tuple(np.asarray(r)) for r in out[:, 6:]}) > 1


def test_generate_with_new_ids_reuses_the_compiled_program():
  llama, base, adapters, prompt, s = llama_stack(False)
  mixed = lj.inject(llama, s.spec)
  from lora_jax.models import generation
  before = generation._generate._cache_size()
  for names in (["a", "b", "c", None], [None, "c", "c", "a"]):
    generate(mixed, lj.combine(s.params, base), prompt, max_new_tokens=2,
             model_kwargs={"adapter_ids": s.ids(names)})
  assert generation._generate._cache_size() == before + 1


@functools.cache
def stack_training(shape=(1, 1, 1), accum_steps=1):
  """Three adapters (different ranks, one DoRA) trained in one stack for two steps.

  SGD: its update is linear in the gradient, so float32 round-off stays round-off
  (Adam divides near-zero gradients by their own size).
  """
  llama, base, adapters, prompt, s = llama_stack(True)
  ids = jnp.asarray(np.random.default_rng(1).integers(0, 256, (8, 12)), jnp.int32)
  adapter_ids = jnp.array([0, 2, 1, 0, 2, 0, 1, 2], jnp.int32)
  mixed = lj.inject(llama, s.spec)
  mesh = sharding.make_mesh(*shape, devices=jax.devices()[:int(np.prod(shape))])
  abstract = jax.eval_shape(mixed.init, jax.random.key(0), ids)["params"]
  step = train.make_train_step(train.MixedLoss(mixed, s.spec.count), optax.sgd(0.5), mesh,
                               abstract, accum_steps=accum_steps, layouts=dict(s.layouts))
  trained, opt, frozen = step.place(lj.combine(s.params, base))
  batch = step.shard_batch({"input_ids": ids, "adapter_ids": adapter_ids})
  for i in range(2):
    trained, opt, metrics = step.step(trained, opt, frozen, batch, jax.random.key(i))
  result = s.replace(params=lj.combine(jax.tree.map(np.asarray, trained),
                                       lj.split(s.params)[1]))
  return result, ids, adapter_ids


def test_k_adapters_train_in_one_step_as_in_k_separate_runs():
  llama, base, adapters, _, s = llama_stack(True)
  result, ids, adapter_ids = stack_training()
  mesh = sharding.make_mesh(1, 1, 1, devices=jax.devices()[:1])
  for k, name in enumerate(s.names):
    tree, config = adapters[name]
    model = lj.inject(llama, config)
    abstract = jax.eval_shape(model.init, jax.random.key(0), ids)["params"]
    step = train.make_train_step(train.causal_lm_loss(model), optax.sgd(0.5), mesh, abstract,
                                 config)
    trained, opt, frozen = step.place(lj.combine(tree, base))
    batch = step.shard_batch({"input_ids": ids[np.asarray(adapter_ids) == k]})
    for i in range(2):
      trained, opt, _ = step.step(trained, opt, frozen, batch, jax.random.key(i))
    got, got_config = result.adapter(name)
    assert got_config == config
    moved = False
    for a, b, start in zip(jax.tree.leaves(got), jax.tree.leaves(trained), jax.tree.leaves(tree)):
      np.testing.assert_allclose(a, b, rtol=2e-5, atol=2e-6)
      moved |= not np.allclose(a, start)
    assert moved


@pytest.mark.parametrize("shape,accum", [((2, 2, 2), 1), ((1, 1, 1), 2)], ids=str)
def test_stack_training_sharded_or_accumulated_equals_one_device(shape, accum):
  ref = stack_training()[0]
  got = stack_training(shape, accum)[0]
  for a, b in zip(jax.tree.leaves(got.params), jax.tree.leaves(ref.params)):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)


def test_an_adapter_set_stacks_in_its_order():
  model, base, adapters = block_adapters()
  named = lj.AdapterSet()
  for name in ("rs", "plain"):
    named.add(name, *adapters[name])
  s = named.stack(model, X, max_rank=5)
  assert s.names == ("rs", "plain") and s.spec.max_rank == 5
  for name in named:
    for a, b in zip(jax.tree.leaves(s.adapter(name)[0]), jax.tree.leaves(named[name][0])):
      np.testing.assert_array_equal(a, b)


def test_same_config_adapters_swap_in_the_plain_injected_model_without_recompiling():
  """Without a stack, adapters of one config share the compiled forward and generate."""
  llama, base, _, prompt, _ = llama_stack(False)
  config = lj.LoRAConfig(rank=2, targets=["q_proj", "v_proj"])
  model = lj.inject(llama, config)
  forward = jax.jit(lambda params, ids: model.apply({"params": params}, ids))
  from lora_jax.models import generation
  before = generation._generate._cache_size()
  outs = []
  for seed in (5, 6):
    params = lj.combine(_trained(llama, config, base, seed, prompt, noise=0.5)[0], base)
    outs.append(forward(params, prompt))
    generate(model, params, prompt, max_new_tokens=2)
  assert forward._cache_size() == 1 and generation._generate._cache_size() == before + 1
  assert float(jnp.abs(outs[0] - outs[1]).max()) > 1e-3


def test_a_stack_runs_on_a_quantized_base():
  model, base, adapters = block_adapters()
  quantized = lj.quantize_params(base, "int8", exclude=())
  s = lj.stack_adapters(model, adapters, X)
  names = ["dora", "plain", None, "rs", "dora"]
  y = lj.inject(model, s.spec).apply({"params": lj.combine(s.params, quantized)}, X,
                                     adapter_ids=s.ids(names))
  for i, name in enumerate(names):
    if name is None:
      ref = lj.quantized_model(model).apply({"params": quantized}, X[i:i + 1])
    else:
      ref = _alone(model, quantized, adapters, name, X[i:i + 1])
    np.testing.assert_allclose(y[i:i + 1], ref, rtol=1e-5, atol=1e-5)
