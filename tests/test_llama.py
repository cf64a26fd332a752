"""The Llama model against published sizes, HF's algorithms and itself.

Params come from `random_params` (shapes by `jax.eval_shape`, values from
numpy): compiling `init`'s random number generation costs seconds on CPU.
"""

import dataclasses
import functools
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lora_jax.models import generation
from lora_jax.models.llama import (
    Llama, LlamaConfig, RopeScaling, config_for, generate, init_cache, rope_frequencies,
    stack_layers, unstack_layers)

TINY = config_for("tiny")


def random_params(config, seed=0):
  """Unboxed params with O(1) activations: kernels ~ N(0, 1/fan_in)."""
  shapes = jax.eval_shape(Llama(config).init, jax.random.key(0), jnp.zeros((1, 1), jnp.int32))
  rng = np.random.default_rng(seed)

  def fill(path, s):
    if path[-1].key == "scale":
      return 1 + 0.1 * rng.standard_normal(s.shape).astype(np.float32)
    std = 1.0 if path[-1].key == "embedding" else s.shape[-2] ** -0.5
    return (std * rng.standard_normal(s.shape)).astype(np.float32)

  return jax.tree_util.tree_map_with_path(fill, nn.unbox(shapes["params"]))


@functools.cache
def forward(config):
  """One jitted forward per config."""
  model = Llama(config)
  return jax.jit(lambda p, ids, mask=None: model.apply({"params": p}, ids, mask))


@pytest.fixture(scope="module")
def params():
  return random_params(TINY)


@pytest.fixture(scope="module")
def ids():
  return jnp.asarray(np.random.default_rng(1).integers(0, TINY.vocab_size, (2, 8)), jnp.int32)


@pytest.fixture(scope="module")
def logits(params, ids):
  return forward(TINY)(params, ids)


# --- Config and sizes ------------------------------------------------------


@pytest.mark.parametrize("name, total", [
    ("llama-3.2-1b", 1_235_814_400),
    ("llama-3.1-8b", 8_030_261_248),
    ("llama-3.1-70b", 70_553_706_496),
    ("llama-2-7b", 6_738_415_616),
])
def test_preset_param_counts_equal_published_totals(name, total):
  config = config_for(name, scan_layers=True)
  shapes = jax.eval_shape(Llama(config).init, jax.random.key(0), jnp.zeros((1, 1), jnp.int32))
  assert sum(math.prod(s.shape) for s in jax.tree.leaves(shapes)) == total
  assert ("lm_head" in shapes["params"]) == (not config.tie_word_embeddings)


def test_config_normalises_and_derives():
  c = config_for("llama-3.1-8b", dtype="bfloat16", rope_scaling={
      "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
      "high_freq_factor": 4.0, "original_max_position_embeddings": 8192})
  assert c == config_for("llama-3.1-8b", dtype=jnp.bfloat16)
  assert hash(c) == hash(config_for("llama-3.1-8b", dtype=jnp.bfloat16))
  assert c.rope_scaling == RopeScaling(8.0, 1.0, 4.0, 8192) == RopeScaling.of((8.0, 1, 4, 8192))
  assert c.head_dim == 128 and config_for("llama-3.1-8b", hidden_size=2048).head_dim == 64
  direct = LlamaConfig(32000, 4096, 11008, 32, 32, 32, rope_scaling=(8.0, 1.0, 4.0, 8192))
  assert direct.head_dim == 128 and isinstance(direct.rope_scaling, RopeScaling)
  with pytest.raises(ValueError, match="remat"):
    config_for("tiny", remat="sometimes")
  with pytest.raises(ValueError, match="num_kv_heads"):
    config_for("tiny", num_kv_heads=3)
  with pytest.raises(KeyError, match="tiny"):
    config_for("llama-9")


def test_names_shapes_and_logical_partitioning():
  config = dataclasses.replace(TINY, scan_layers=True)
  boxed = jax.eval_shape(Llama(config).init, jax.random.key(0), jnp.zeros((1, 1), jnp.int32))
  specs = nn.get_partition_spec(boxed)["params"]
  n, h, kv, d = config.num_layers, config.num_heads, config.num_kv_heads, config.head_dim
  expected = {
      "embed_tokens/embedding": ((256, 64), ("vocab", "embed")),
      "layers/input_layernorm/scale": ((n, 64), ("layers", "norm")),
      "layers/self_attn/q_proj/kernel": ((n, 64, h * d), ("layers", "embed", "heads")),
      "layers/self_attn/k_proj/kernel": ((n, 64, kv * d), ("layers", "embed", "kv")),
      "layers/self_attn/v_proj/kernel": ((n, 64, kv * d), ("layers", "embed", "kv")),
      "layers/self_attn/o_proj/kernel": ((n, h * d, 64), ("layers", "heads", "embed")),
      "layers/post_attention_layernorm/scale": ((n, 64), ("layers", "norm")),
      "layers/mlp/gate_proj/kernel": ((n, 64, 128), ("layers", "embed", "mlp")),
      "layers/mlp/up_proj/kernel": ((n, 64, 128), ("layers", "embed", "mlp")),
      "layers/mlp/down_proj/kernel": ((n, 128, 64), ("layers", "mlp", "embed")),
      "norm/scale": ((64,), ("norm",)),
      "lm_head/kernel": ((64, 256), ("embed", "vocab")),
  }
  is_spec = lambda x: isinstance(x, jax.sharding.PartitionSpec)
  flat = {"/".join(k.key for k in path): (leaf.shape, tuple(spec)) for (path, leaf), spec in zip(
      jax.tree_util.tree_leaves_with_path(nn.unbox(boxed)["params"]),
      jax.tree.leaves(specs, is_leaf=is_spec))}
  assert flat == expected
  # Unscanned: the same without the layer axis, under layers_{i}.
  unscanned = nn.get_partition_spec(jax.eval_shape(
      Llama(TINY).init, jax.random.key(0), jnp.zeros((1, 1), jnp.int32)))["params"]
  assert tuple(unscanned["layers_1"]["mlp"]["down_proj"]["kernel"]) == ("mlp", "embed")


def test_sharded_apply_under_logical_rules(params, ids, logits):
  mesh = jax.make_mesh((2, 4), ("data", "model"), axis_types=(jax.sharding.AxisType.Auto,) * 2)
  rules = (("batch", "data"), ("vocab", "model"), ("heads", "model"), ("kv", "model"),
           ("mlp", "model"), ("embed", None), ("length", None), ("norm", None))
  boxed = jax.eval_shape(Llama(TINY).init, jax.random.key(0), jnp.zeros((1, 1), jnp.int32))
  shardings = nn.logical_to_mesh_sharding(nn.get_partition_spec(boxed), mesh, rules)["params"]
  sharded = jax.device_put(params, shardings)
  assert sharded["lm_head"]["kernel"].sharding.spec == jax.sharding.PartitionSpec(None, "model")
  with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
    apply = jax.jit(lambda p, x: Llama(TINY).apply({"params": p}, x))
    assert "sharding_constraint" in apply.lower(sharded, ids).as_text()  # activations too
    out = apply(sharded, ids)
  np.testing.assert_allclose(out, logits, atol=1e-5)


# --- Numerics --------------------------------------------------------------


def reference_logits(p, c, ids):
  """HF's Llama forward in float64 numpy: rotate_half, repeat_kv, causal softmax."""
  p = jax.tree.map(lambda x: np.asarray(x, np.float64), p)
  ids = np.asarray(ids)
  b, length = ids.shape
  h, kv, d = c.num_heads, c.num_kv_heads, c.head_dim

  def rms(x, w):
    return x / np.sqrt(np.mean(x ** 2, -1, keepdims=True) + c.rms_norm_eps) * w

  def rotate_half(x):
    return np.concatenate([-x[..., d // 2:], x[..., :d // 2]], -1)

  inv_freq = 1.0 / c.rope_theta ** (np.arange(0, d, 2) / d)
  freqs = np.outer(np.arange(length), inv_freq)
  cos, sin = np.cos(np.concatenate([freqs] * 2, -1)), np.sin(np.concatenate([freqs] * 2, -1))
  causal = np.tril(np.ones((length, length), bool))
  x = p["embed_tokens"]["embedding"][ids]
  for i in range(c.num_layers):
    lp = p[f"layers_{i}"]
    a = lp["self_attn"]
    y = rms(x, lp["input_layernorm"]["scale"])
    q = (y @ a["q_proj"]["kernel"]).reshape(b, length, h, d).transpose(0, 2, 1, 3)
    k = (y @ a["k_proj"]["kernel"]).reshape(b, length, kv, d).transpose(0, 2, 1, 3)
    v = (y @ a["v_proj"]["kernel"]).reshape(b, length, kv, d).transpose(0, 2, 1, 3)
    q, k = q * cos + rotate_half(q) * sin, k * cos + rotate_half(k) * sin
    k, v = np.repeat(k, h // kv, axis=1), np.repeat(v, h // kv, axis=1)
    s = np.where(causal, q @ k.swapaxes(-1, -2) / np.sqrt(d), -np.inf)
    probs = np.exp(s - s.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    x = x + (probs @ v).transpose(0, 2, 1, 3).reshape(b, length, h * d) @ a["o_proj"]["kernel"]
    y = rms(x, lp["post_attention_layernorm"]["scale"])
    m = lp["mlp"]
    gate = y @ m["gate_proj"]["kernel"]
    x = x + (gate / (1 + np.exp(-gate)) * (y @ m["up_proj"]["kernel"])) @ m["down_proj"]["kernel"]
  x = rms(x, p["norm"]["scale"])
  if c.tie_word_embeddings:
    return x @ p["embed_tokens"]["embedding"].T
  return x @ p["lm_head"]["kernel"]


@pytest.mark.parametrize("overrides", [
    dict(num_layers=1),                                       # GQA, 2 query heads per kv head
    dict(num_layers=1, num_kv_heads=1, tie_word_embeddings=True),  # MQA, tied
    dict(num_kv_heads=4),                                     # plain multi-head
], ids=["gqa", "mqa_tied", "mha"])
def test_matches_numpy_reference(overrides, ids):
  config = dataclasses.replace(TINY, **overrides)
  p = random_params(config, seed=2)
  out = forward(config)(p, ids)
  assert out.dtype == jnp.float32 and out.shape == (*ids.shape, config.vocab_size)
  np.testing.assert_allclose(out, reference_logits(p, config, ids), atol=2e-4, rtol=1e-4)


def test_stack_unstack_layers_roundtrip(params):
  stacked = stack_layers(params)
  assert set(stacked) == {"embed_tokens", "layers", "norm", "lm_head"}
  assert stacked["layers"]["mlp"]["up_proj"]["kernel"].shape == (2, 64, 128)
  jax.tree.map(np.testing.assert_array_equal, unstack_layers(stacked), params)
  # numpy stays numpy, and boxes gain/lose the 'layers' axis name.
  as_numpy = jax.tree.map(np.asarray, params)
  assert isinstance(stack_layers(as_numpy)["layers"]["mlp"]["up_proj"]["kernel"], np.ndarray)
  boxed = jax.eval_shape(Llama(TINY).init, jax.random.key(0), jnp.zeros((1, 1), jnp.int32))
  box = stack_layers(boxed["params"])["layers"]["self_attn"]["q_proj"]["kernel"]
  assert box.names == ("layers", "embed", "heads")
  assert unstack_layers({"layers": {"k": box}})["layers_1"]["k"].names == ("embed", "heads")


def test_scanned_equals_unscanned(params, ids, logits):
  scanned = dataclasses.replace(TINY, scan_layers=True)
  np.testing.assert_allclose(forward(scanned)(stack_layers(params), ids), logits, atol=1e-5)


def test_padding_left_or_right_leaves_real_tokens_unchanged(params, ids):
  pad = jnp.full((2, 3), 7, jnp.int32)
  row = ids[1:, :5]
  alone = forward(TINY)(params, row)
  padded_ids = jnp.concatenate([ids[:, :5], pad], axis=1)          # right padding
  mask = jnp.ones((2, 8), jnp.int32).at[:, 5:].set(0)
  out = forward(TINY)(params, padded_ids, mask)
  np.testing.assert_allclose(out[1:, :5], alone, atol=1e-5)
  padded_ids = jnp.concatenate([pad, ids[:, :5]], axis=1)          # left padding
  mask = jnp.ones((2, 8), jnp.int32).at[:, :3].set(0)
  out = forward(TINY)(params, padded_ids, mask)
  np.testing.assert_allclose(out[1:, 3:], alone, atol=1e-5)
  assert np.isfinite(np.asarray(out)).all()


def meta_apply_scaling(freqs, factor, low, high, old_len):
  """Meta's reference loop (llama-models), which HF's vectorised code mirrors."""
  low_freq_wavelen, high_freq_wavelen = old_len / low, old_len / high
  out = []
  for freq in freqs:
    wavelen = 2 * math.pi / freq
    if wavelen < high_freq_wavelen:
      out.append(freq)
    elif wavelen > low_freq_wavelen:
      out.append(freq / factor)
    else:
      smooth = (old_len / wavelen - low) / (high - low)
      out.append((1 - smooth) * freq / factor + smooth * freq)
  return np.array(out)


@pytest.mark.parametrize("name", ["llama-3.2-1b", "llama-3.1-8b", "llama-3.1-70b", "llama-2-7b"])
def test_rope_frequencies_match_hf(name):
  c = config_for(name)
  freqs = 1.0 / c.rope_theta ** (np.arange(0, c.head_dim, 2) / c.head_dim)
  if c.rope_scaling is not None:
    s = c.rope_scaling
    freqs = meta_apply_scaling(freqs, s.factor, s.low_freq_factor, s.high_freq_factor,
                               s.original_max_position_embeddings)
  got = rope_frequencies(c)
  assert got.dtype == np.float32 and got.shape == (c.head_dim // 2,)
  np.testing.assert_allclose(got, freqs, rtol=2e-6)
  if c.rope_scaling is not None:  # all three regimes are exercised
    ratio = got / (1.0 / c.rope_theta ** (np.arange(0, c.head_dim, 2) / c.head_dim))
    assert np.isclose(ratio[0], 1) and np.isclose(ratio[-1], 1 / c.rope_scaling.factor)
    assert ((ratio < 0.999) & (ratio > 1.001 / c.rope_scaling.factor)).any()


def loss_and_grad(config, params, ids):
  def loss(p):
    out = Llama(config).apply({"params": p}, ids)
    return -jnp.mean(jax.nn.log_softmax(out)[..., 0]), out
  return jax.jit(jax.value_and_grad(loss, has_aux=True))(params)


@pytest.fixture(scope="module")
def grads(params, ids):
  return loss_and_grad(TINY, params, ids)[1]


@pytest.mark.parametrize("remat, scan", [("full", False), ("dots_with_no_batch_dims", True)])
def test_remat_keeps_logits_and_gradients(params, ids, logits, grads, remat, scan):
  config = dataclasses.replace(TINY, remat=remat, scan_layers=scan)
  (_, out), got = loss_and_grad(config, stack_layers(params) if scan else params, ids)
  np.testing.assert_allclose(out, logits, atol=1e-5)
  jax.tree.map(functools.partial(np.testing.assert_allclose, atol=1e-6, rtol=1e-4),
               got, stack_layers(grads) if scan else grads)


def test_bf16_compute_gives_float32_logits_close_to_fp32(params, ids, logits):
  config = dataclasses.replace(TINY, dtype=jnp.bfloat16)
  out = forward(config)(params, ids)
  assert out.dtype == jnp.float32
  scale = float(jnp.abs(logits).max())
  assert float(jnp.abs(out - logits).max()) < 0.05 * scale


# --- Decoding --------------------------------------------------------------


def test_cached_decode_logits_equal_full_forward(params, ids, logits):
  model = Llama(TINY)
  cache = init_cache(model, 2, 8)
  assert cache["layers_0"]["self_attn"]["cached_key"].shape == (2, 8, 2, 16)
  apply = jax.jit(lambda c, x: model.apply({"params": params, "cache": c}, x,
                                           decode=True, mutable=["cache"]))
  out, v = apply(cache, ids[:, :5])                      # prefill
  np.testing.assert_allclose(out, logits[:, :5], atol=1e-5)
  for t in range(5, 8):                                  # then one token a call
    out, v = apply(v["cache"], ids[:, t:t + 1])
    np.testing.assert_allclose(out[:, 0], logits[:, t], atol=1e-5)
  assert int(v["cache"]["layers_1"]["self_attn"]["cache_index"]) == 8


def greedy_by_full_recompute(config, params, prompt, mask, n):
  """Greedy decoding without a cache: the whole forward pass every token.

  The sequence lives in a fixed buffer, right-padded with masked slots, which
  causal attention never reads: one compile for all steps.
  """
  b, length = prompt.shape
  ids = jnp.concatenate([prompt, jnp.zeros((b, n), jnp.int32)], axis=1)
  full_mask = jnp.concatenate([mask, jnp.zeros((b, n), mask.dtype)], axis=1)
  for t in range(length, length + n):
    out = forward(config)(params, ids, full_mask)
    ids = ids.at[:, t].set(jnp.argmax(out[:, t - 1], axis=-1))
    full_mask = full_mask.at[:, t].set(1)
  return ids


@pytest.mark.parametrize("scan", [False, True])
def test_greedy_generate_equals_full_recompute(params, ids, scan):
  config = dataclasses.replace(TINY, scan_layers=scan)
  p = stack_layers(params) if scan else params
  prompt = ids[:, :5].at[0, :2].set(0)                   # row 0 left-padded by 2
  mask = jnp.ones((2, 5), jnp.int32).at[0, :2].set(0)
  got = generate(Llama(config), p, prompt, max_new_tokens=6, attention_mask=mask)
  assert got.shape == (2, 11) and got.dtype == jnp.int32
  np.testing.assert_array_equal(got, greedy_by_full_recompute(TINY, params, prompt, mask, 6))


def test_sampling_is_deterministic_for_a_fixed_rng(params, ids):
  model = Llama(TINY)
  sample = functools.partial(generate, model, params, ids[:, :3], max_new_tokens=8,
                             temperature=1.0)
  a = sample(rng=jax.random.key(3))
  compiled = generation._generate._cache_size()
  np.testing.assert_array_equal(a, sample(rng=jax.random.key(3)))
  np.testing.assert_array_equal(a[:, :3], ids[:, :3])
  assert not np.array_equal(a, sample(rng=jax.random.key(4)))
  assert not np.array_equal(a, sample(rng=jax.random.key(3), temperature=2.0))
  assert generation._generate._cache_size() == compiled  # new keys/temperatures: no recompile
  with pytest.raises(ValueError, match="rng"):
    generate(model, params, ids, max_new_tokens=2, temperature=0.5)


def test_a_key_per_row_samples_each_row_as_it_would_alone(params, ids):
  model = Llama(TINY)
  sample = functools.partial(generate, model, params, max_new_tokens=8, temperature=1.0)
  keys = jnp.stack([jax.random.key(5), jax.random.key(6)])
  both = np.asarray(sample(ids[:, :3], rng=keys))
  for row in range(2):
    np.testing.assert_array_equal(both[row:row + 1],
                                  sample(ids[row:row + 1, :3], rng=keys[row:row + 1]))
  swapped = np.asarray(sample(ids[:, :3], rng=keys[::-1]))
  assert not np.array_equal(both[0], swapped[0])         # each row draws from its own key
  np.testing.assert_array_equal(sample(ids[:, :3], rng=jax.random.PRNGKey(3)),
                                sample(ids[:, :3], rng=jax.random.key(3)))  # raw key data
  with pytest.raises(ValueError, match="one per row"):
    sample(ids[:, :3], rng=jnp.stack([jax.random.key(1)] * 3))


def test_generate_stops_rows_at_stop_ids_and_keeps_the_rest(params, ids):
  model = Llama(TINY)
  free = np.asarray(generate(model, params, ids[:, :3], max_new_tokens=8))
  stop = int(free[0, 5])                                 # row 0's third new token
  got = np.asarray(generate(model, params, ids[:, :3], max_new_tokens=8, stop_ids=[stop]))
  for row in range(2):
    new, ref = got[row, 3:], free[row, 3:]
    hits = np.flatnonzero(ref == stop)
    end = hits[0] + 1 if hits.size else len(ref)
    np.testing.assert_array_equal(new[:end], ref[:end])
    assert (new[end:] == stop).all()
  assert (got[0, 6:] == stop).all()


def test_generate_never_produces_ids_past_vocab_size(params, ids):
  model = Llama(TINY)
  free = np.asarray(generate(model, params, ids[:, :3], max_new_tokens=8))[:, 3:]
  limit = int(free.max())                                # the largest id it picks is now barred
  got = np.asarray(generate(model, params, ids[:, :3], max_new_tokens=8, vocab_size=limit))
  assert got[:, 3:].max() < limit
  sampled = generate(model, params, ids[:, :3], max_new_tokens=8, vocab_size=limit,
                     temperature=5.0, rng=jax.random.key(0))
  assert int(np.asarray(sampled)[:, 3:].max()) < limit
  with pytest.raises(ValueError, match="vocab_size"):
    generate(model, params, ids, max_new_tokens=1, vocab_size=TINY.vocab_size + 1)


def test_top_p_keeps_only_the_nucleus(params, ids):
  model = Llama(TINY)
  greedy = generate(model, params, ids[:, :3], max_new_tokens=8)
  narrow = generate(model, params, ids[:, :3], max_new_tokens=8, temperature=1.0, top_p=1e-6,
                    rng=jax.random.key(1))
  np.testing.assert_array_equal(narrow, greedy)          # the nucleus is the top token alone
  wide = generate(model, params, ids[:, :3], max_new_tokens=8, temperature=1.0,
                  rng=jax.random.key(1))
  assert not np.array_equal(wide, greedy)
  with pytest.raises(ValueError, match="top_p"):
    generate(model, params, ids, max_new_tokens=1, top_p=0.0)
