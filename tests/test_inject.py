"""Injection into unmodified linen models: ours, flax's and Hugging Face's."""

import functools

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import host_random
import lora_jax as lj


class Block(nn.Module):
  """Dense, DenseGeneral and Einsum, called with extra positional and keyword args."""

  @nn.compact
  def __call__(self, x, scale, *, shift=0.0):
    h = nn.Dense(16, name="up")(x) * scale + shift
    h = nn.DenseGeneral((2, 8), name="heads")(h)
    h = nn.Einsum((2, 8, 16), "...hd,hdo->...o", name="merge")(h)
    return x + nn.LayerNorm(name="norm")(h)


class ScanLayer(nn.Module):
  @nn.compact
  def __call__(self, carry, scale):
    return Block(name="block")(carry, scale, shift=0.5), None


class Zoo(nn.Module):
  """Every composition the injection must see through."""

  @nn.compact
  def __call__(self, x):
    shared = nn.Dense(16, name="shared")
    x = shared(x)
    x = shared(jnp.tanh(x))  # one module, two calls
    x = nn.remat(Block)(name="remat_block")(x, 2.0, shift=1.0)
    x, _ = nn.scan(ScanLayer, variable_axes={"params": 0}, split_rngs={"params": True},
                   in_axes=nn.broadcast, length=3)(name="stack")(x, 0.5)
    ensemble = nn.vmap(nn.Dense, variable_axes={"params": 0}, split_rngs={"params": True},
                       in_axes=None, out_axes=0, axis_size=2)(4, name="ensemble")
    return ensemble(x).sum(0) + nn.Dense(4, name="head")(x)


X = host_random.normal(1, (3, 16))


@pytest.fixture(scope="module")
def zoo_params():
  return jax.jit(Zoo().init)(jax.random.key(0), X)["params"]


@functools.cache
def _zoo_apply(model):
  """One compiled forward per model (eager scan and remat are slow)."""
  return jax.jit(lambda p: model.apply({"params": p}, X))


def _randomize_adapters(params, seed=5):
  """Random adapters (drawn on the host: no compile per adapter shape)."""
  adapters, base = lj.split(params)
  leaves, treedef = jax.tree.flatten(adapters)
  adapters = jax.tree.unflatten(
      treedef, [host_random.nudge(l, 1000 * seed + i, 0.2) for i, l in enumerate(leaves)])
  return lj.combine(adapters, base)


def test_adapters_exactly_at_selected_paths(zoo_params):
  config = lj.LoRAConfig(rank=2, targets=["up", "merge", "shared", "ensemble"],
                         rank_pattern={"stack/.*": 3})
  model = lj.inject(Zoo(), config)
  params = lj.init_adapters(model, zoo_params, jax.random.key(2), X)
  adapters, base = lj.split(params)
  assert jax.tree.map(jnp.shape, adapters) == {
      "shared": {"lora_a": (16, 2), "lora_b": (2, 16)},
      "remat_block": {"up": {"lora_a": (16, 2), "lora_b": (2, 16)},
                      "merge": {"lora_a": (2, 8, 2), "lora_b": (2, 16)}},
      "stack": {"block": {"up": {"lora_a": (3, 16, 3), "lora_b": (3, 3, 16)},
                          "merge": {"lora_a": (3, 2, 8, 3), "lora_b": (3, 3, 16)}}},
      "ensemble": {"lora_a": (2, 16, 2), "lora_b": (2, 2, 4)},
  }
  assert jax.tree.structure(base) == jax.tree.structure(zoo_params)
  for given, kept in zip(jax.tree.leaves(zoo_params), jax.tree.leaves(base)):
    assert given is kept  # never re-initialised, not even copied
  # init gives the same tree, freshly initialised.
  fresh = jax.eval_shape(model.init, jax.random.key(0), X)["params"]
  assert jax.tree.map(jnp.shape, fresh) == jax.tree.map(jnp.shape, params)


def test_targets_lists_candidates_and_selection():
  every = lj.targets(Zoo(), None, X)
  assert every == ["shared", "remat_block/up", "remat_block/heads", "remat_block/merge",
                   "stack/block/up", "stack/block/heads", "stack/block/merge", "ensemble", "head"]
  assert lj.targets(Zoo(), lj.LoRAConfig(), X) == every[:-1]  # all-linear skips the head
  assert lj.targets(Zoo(), lj.LoRAConfig(targets=".*/block/.*"), X) == every[4:7]
  injected = lj.inject(Zoo(), lj.LoRAConfig())
  assert lj.targets(injected, None, X) == every


@pytest.mark.parametrize("use_dora", [False, True])
def test_zero_init_injected_equals_base_bit_for_bit(zoo_params, use_dora):
  model = lj.inject(Zoo(), lj.LoRAConfig(rank=4, use_dora=use_dora))
  params = lj.init_adapters(model, zoo_params, jax.random.key(2), X)
  y, y_base = _zoo_apply(model)(params), _zoo_apply(Zoo())(zoo_params)
  if use_dora:  # m / ||W|| is 1 up to the rounding of two norm computations
    np.testing.assert_allclose(y, y_base, rtol=1e-6, atol=1e-6)
  else:
    np.testing.assert_array_equal(y, y_base)


@pytest.mark.parametrize("use_dora", [False, True])
def test_merged_params_in_plain_model_give_injected_outputs(zoo_params, use_dora):
  config = lj.LoRAConfig(rank=4, alpha=6.0, use_dora=use_dora)
  model = lj.inject(Zoo(), config)
  params = _randomize_adapters(lj.init_adapters(model, zoo_params, jax.random.key(2), X))
  y = _zoo_apply(model)(params)
  assert not np.allclose(y, _zoo_apply(Zoo())(zoo_params), atol=1e-3)
  merged = lj.merge(params, config)
  assert jax.tree.structure(merged) == jax.tree.structure(zoo_params)
  np.testing.assert_allclose(_zoo_apply(Zoo())(merged), y, rtol=1e-5, atol=1e-5)


def test_training_moves_only_adapters(zoo_params):
  config = lj.LoRAConfig(rank=4)
  model = lj.inject(Zoo(), config)
  params = lj.init_adapters(model, zoo_params, jax.random.key(2), X)
  target = jnp.sin(X[:, :4])
  tx = lj.optimizer(optax.adam(1e-2), params, config)
  state = tx.init(params)

  @jax.jit
  def step(p, s):
    loss, g = jax.value_and_grad(lambda q: jnp.mean((model.apply({"params": q}, X) - target) ** 2))(p)
    u, s = tx.update(g, s, p)
    return optax.apply_updates(p, u), s, loss

  new = params
  losses = []
  for _ in range(5):
    new, state, loss = step(new, state)
    losses.append(float(loss))
  assert losses[-1] < losses[0]
  adapters_old, base_old = lj.split(params)
  adapters_new, base_new = lj.split(new)
  for a, b in zip(jax.tree.leaves(base_old), jax.tree.leaves(base_new)):
    np.testing.assert_array_equal(a, b)
  assert all(not np.array_equal(a, b) for a, b in zip(jax.tree.leaves(adapters_old),
                                                      jax.tree.leaves(adapters_new)))


def test_init_adapters_abstract_uses_no_memory(zoo_params):
  model = lj.inject(Zoo(), lj.LoRAConfig(rank=4, use_dora=True))
  abstract_base = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), zoo_params)
  direct = lj.init_adapters(model, abstract_base, jax.random.key(2), X)
  under = jax.eval_shape(lambda b: lj.init_adapters(model, b, jax.random.key(2), X), abstract_base)
  concrete = lj.init_adapters(model, zoo_params, jax.random.key(2), X)
  shapes = lambda t: jax.tree.map(lambda l: (l.shape, l.dtype), t)
  assert shapes(direct) == shapes(under) == shapes(concrete)
  assert all(isinstance(l, jax.ShapeDtypeStruct) for l in jax.tree.leaves(direct))


def test_init_adapters_dora_magnitude_from_given_kernel(zoo_params):
  model = lj.inject(Zoo(), lj.LoRAConfig(rank=2, targets=["head"], use_dora=True))
  params = lj.init_adapters(model, zoo_params, jax.random.key(2), X)
  np.testing.assert_allclose(params["head"]["lora_magnitude"],
                             jnp.linalg.norm(zoo_params["head"]["kernel"], axis=0), rtol=1e-6)


def test_init_adapters_errors(zoo_params):
  model = lj.inject(Zoo(), lj.LoRAConfig(rank=2))
  partial = {k: v for k, v in zoo_params.items() if k != "head"}
  with pytest.raises(ValueError, match="base_params lack 2 param.*head/bias"):
    lj.init_adapters(model, partial, jax.random.key(0), X)
  with pytest.raises(ValueError, match="created no adapters"):
    lj.init_adapters(Zoo(), zoo_params, jax.random.key(0), X)


@pytest.mark.parametrize("config, message", [
    (lj.LoRAConfig(targets=["q_proj"]), "target 'q_proj' matches no linear layer; linear layers "
     "of this model: shared, remat_block/up, .*stack/block/up"),
    (lj.LoRAConfig(targets=["norm"]), "target 'norm' names 'remat_block/norm' \\(LayerNorm\\).*"
     "not a linear layer"),
    (lj.LoRAConfig(targets=".*/norm"), "target '.\\*/norm' names 'remat_block/norm' "
     "\\(LayerNorm\\).*not a linear layer"),
    (lj.LoRAConfig(targets="nothing.*"), "target 'nothing.\\*' matches no linear layer"),
    (lj.LoRAConfig(exclude=".*"), "'all-linear' with exclude='.\\*' selects no layer"),
])
def test_bad_selection_raises_listing_candidates(config, message):
  # Traced, not run: the check follows the model's call either way (an eager init raising is
  # test_every_rule_that_matches_nothing_raises's), and the zoo's eager scan and remat are slow.
  with pytest.raises(ValueError, match=message):
    jax.eval_shape(lj.inject(Zoo(), config).init, jax.random.key(0), X)
  with pytest.raises(ValueError, match=message):
    lj.targets(Zoo(), config, X)


def test_bad_regex_and_bad_arguments():
  with pytest.raises(ValueError, match="not a valid regular expression"):
    lj.LoRAConfig(targets="(q_proj")
  with pytest.raises(ValueError, match="expects a flax.linen Module"):
    lj.inject(lambda x: x, lj.LoRAConfig())
  with pytest.raises(ValueError, match="expects a LoRAConfig"):
    lj.inject(Zoo(), {"rank": 4})


def test_injected_model_is_a_model_of_the_same_class():
  model = lj.inject(Zoo(), lj.LoRAConfig())
  assert isinstance(model, Zoo) and type(model).__name__ == "Zoo"
  again = lj.inject(model, lj.LoRAConfig(rank=2))  # re-injection replaces the config
  assert type(again).__mro__[2] is Zoo
  assert lj.inject(Zoo(), lj.LoRAConfig()) == model  # same class and fields: equal
  with pytest.raises(ValueError, match="unbound model"):
    Zoo().bind({"params": {}}).__getattr__  # noqa: B018 (a bound module)
    lj.inject(Zoo().bind({"params": {}}), lj.LoRAConfig())


def test_injected_model_as_a_submodule():
  inner = lj.inject(Block(), lj.LoRAConfig(rank=2, targets=["up"]))

  class Outer(nn.Module):
    block: nn.Module

    @nn.compact
    def __call__(self, x):
      return self.block(nn.Dense(16, name="pre")(x), 1.0)

  params = Outer(inner).init(jax.random.key(0), X)["params"]
  assert set(params["block"]["up"]) == {"kernel", "bias", "lora_a", "lora_b"}
  assert "lora_a" not in params["pre"]  # only the injected part is adapted


def test_dropout_through_injection():
  model = lj.inject(Block(), lj.LoRAConfig(rank=4, targets=["up"], dropout_rate=0.5))
  params = _randomize_adapters(model.init(jax.random.key(0), X, 1.0)["params"])
  y = model.apply({"params": params}, X, 1.0)
  np.testing.assert_array_equal(y, model.apply({"params": params}, X, 1.0))
  y_drop = model.apply({"params": params}, X, 1.0, rngs={"dropout": jax.random.key(3)})
  assert not np.allclose(y, y_drop)


# --- models from outside packages --------------------------------------------------------


def test_flax_multi_head_attention():
  """flax's own attention module: DenseGeneral projections over (heads, head_dim)."""
  attn = nn.MultiHeadDotProductAttention(num_heads=2, qkv_features=8, out_features=6)
  x = host_random.normal(0, (2, 5, 6))
  base = attn.init(jax.random.key(1), x)["params"]
  config = lj.LoRAConfig(rank=2, targets=["query", "value", "out"])
  model = lj.inject(attn, config)
  params = lj.init_adapters(model, base, jax.random.key(2), x)
  assert jax.tree.map(jnp.shape, lj.split(params)[0]) == {
      "query": {"lora_a": (6, 2), "lora_b": (2, 2, 4)},
      "value": {"lora_a": (6, 2), "lora_b": (2, 2, 4)},
      "out": {"lora_a": (2, 4, 2), "lora_b": (2, 6)}}
  np.testing.assert_array_equal(model.apply({"params": params}, x), attn.apply({"params": base}, x))
  params = _randomize_adapters(params)
  np.testing.assert_allclose(attn.apply({"params": lj.merge(params, config)}, x),
                             model.apply({"params": params}, x), rtol=1e-5, atol=1e-5)


@pytest.fixture
def allow_rank_promotion():
  """Hugging Face's code relies on implicit rank promotion."""
  with jax.numpy_rank_promotion("allow"):
    yield


@pytest.fixture(scope="module")
def hf_llama():
  transformers = pytest.importorskip("transformers")
  from transformers.models.llama.modeling_flax_llama import FlaxLlamaForCausalLMModule
  config = transformers.LlamaConfig(
      vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32)
  module = FlaxLlamaForCausalLMModule(config, dtype=jnp.float32)
  ids = jnp.arange(16).reshape(2, 8) % 64
  args = (ids, jnp.ones_like(ids), jnp.broadcast_to(jnp.arange(8), (2, 8)))
  with jax.numpy_rank_promotion("allow"):  # one compiled init, not one compile per op
    return module, jax.jit(module.init)(jax.random.key(0), *args)["params"], args


def test_hugging_face_flax_llama(hf_llama, allow_rank_promotion):
  """Hugging Face's Flax Llama, unmodified: adapters on q/v, exact at init, merge equal."""
  module, base, args = hf_llama
  config = lj.LoRAConfig(rank=2, alpha=4.0, targets=["q_proj", "v_proj"])
  assert lj.targets(module, config, *args) == [
      "model/layers/0/self_attn/q_proj", "model/layers/0/self_attn/v_proj",
      "model/layers/1/self_attn/q_proj", "model/layers/1/self_attn/v_proj"]
  model = lj.inject(module, config)
  params = lj.init_adapters(model, base, jax.random.key(1), *args)
  assert jax.tree.map(jnp.shape, lj.split(params)[0]["model"]["layers"]["1"]) == {
      "self_attn": {"q_proj": {"lora_a": (32, 2), "lora_b": (2, 32)},
                    "v_proj": {"lora_a": (32, 2), "lora_b": (2, 16)}}}
  logits = lambda m, p: m.apply({"params": p}, *args).logits
  np.testing.assert_array_equal(logits(model, params), logits(module, base))
  params = _randomize_adapters(params)
  np.testing.assert_allclose(logits(module, lj.merge(params, config)), logits(model, params),
                             rtol=1e-5, atol=1e-5)


# --- the reference Llama ---------------------------------------------------------------

from lora_jax.models.llama import Llama, config_for, stack_layers  # noqa: E402

IDS = jnp.asarray(np.random.default_rng(1).integers(0, 256, (2, 8)), jnp.int32)


def _llama_params(config, seed=0):
  """Unboxed random params, filled on the host (faster than compiling init)."""
  shapes = nn.unbox(jax.eval_shape(Llama(config).init, jax.random.key(0), IDS)["params"])
  rng = np.random.default_rng(seed)
  return jax.tree.map(lambda s: (rng.standard_normal(s.shape) * s.shape[-1] ** -0.5)
                      .astype(np.float32), shapes)


def _logits(model):
  return jax.jit(lambda p: model.apply({"params": p}, IDS))


@pytest.mark.parametrize("scan", [False, True], ids=["layers_i", "scanned"])
def test_reference_llama(scan):
  llama = Llama(config_for("tiny", scan_layers=scan))
  base = _llama_params(llama.config)
  config = lj.LoRAConfig(rank=4, alpha=8.0, targets=["q_proj", "v_proj", "down_proj"])
  model = lj.inject(llama, config)
  params = lj.init_adapters(model, base, jax.random.key(2), IDS)
  lead = (2,) if scan else ()
  layer = {"self_attn": {"q_proj": {"lora_a": lead + (64, 4), "lora_b": lead + (4, 64)},
                         "v_proj": {"lora_a": lead + (64, 4), "lora_b": lead + (4, 32)}},
           "mlp": {"down_proj": {"lora_a": lead + (128, 4), "lora_b": lead + (4, 64)}}}
  expected = {"layers": layer} if scan else {"layers_0": layer, "layers_1": layer}
  assert jax.tree.map(jnp.shape, lj.split(params)[0]) == expected
  np.testing.assert_array_equal(_logits(model)(params), _logits(llama)(base))
  params = _randomize_adapters(params)
  y = _logits(model)(params)
  np.testing.assert_allclose(_logits(llama)(lj.merge(params, config)), y, rtol=1e-4, atol=1e-4)


def test_reference_llama_scanned_equals_unscanned_with_adapters():
  config = lj.LoRAConfig(rank=4, use_dora=True)
  flat = lj.inject(Llama(config_for("tiny")), config)
  params = _randomize_adapters(
      lj.init_adapters(flat, _llama_params(flat.config), jax.random.key(2), IDS))
  scanned = lj.inject(Llama(config_for("tiny", scan_layers=True)), config)
  np.testing.assert_allclose(_logits(scanned)(stack_layers(params)), _logits(flat)(params),
                             rtol=1e-5, atol=1e-5)


def test_plan_an_8b_model_without_memory():
  """All-linear r=16 on Llama-3.1-8B: PEFT's 41,943,040 adapter params, abstractly."""
  llama = Llama(config_for("llama-3.1-8b", scan_layers=True))
  ids = jnp.zeros((1, 4), jnp.int32)
  config = lj.LoRAConfig(rank=16, alpha=32)
  assert lj.targets(llama, config, ids) == [
      f"layers/{m}" for m in ("self_attn/q_proj", "self_attn/k_proj", "self_attn/v_proj",
                              "self_attn/o_proj", "mlp/gate_proj", "mlp/up_proj",
                              "mlp/down_proj")]
  base = nn.unbox(jax.eval_shape(llama.init, jax.random.key(0), ids)["params"])
  params = lj.init_adapters(lj.inject(llama, config), base, jax.random.key(1), ids)
  counts = lj.count(params)
  assert counts["lora"] == 41_943_040
  assert counts["frozen"] == 8_030_261_248


def test_dense_subclass_calling_super_is_adapted_once():
  """The adapter sits on the `x @ kernel` call, so the merged kernel gives the same result."""
  class Doubled(nn.Dense):
    def __call__(self, x):
      return super().__call__(x) * 2

  class Net(nn.Module):
    @nn.compact
    def __call__(self, x):
      return Doubled(4, name="proj")(x)

  config = lj.LoRAConfig(rank=2)
  model = lj.inject(Net(), config)
  params = _randomize_adapters(model.init(jax.random.key(0), X)["params"])
  np.testing.assert_allclose(Net().apply({"params": lj.merge(params, config)}, X),
                             model.apply({"params": params}, X), rtol=1e-5, atol=1e-5)


def test_init_adapters_takes_extra_rngs(zoo_params):
  model = lj.inject(Zoo(), lj.LoRAConfig(rank=2, targets=["head"]))
  params = lj.init_adapters(model, zoo_params, jax.random.key(2), X,
                            rngs={"dropout": jax.random.key(3)})
  assert "lora_a" in params["head"]


# --- what is and is not a layer of the model -------------------------------------------

class TiedHead(nn.Module):
  """A head tied to the embedding the way Hugging Face's Flax models compute it."""

  def setup(self):
    self.embed = nn.Embed(12, 8)
    self.body = nn.Dense(8)
    self.lm_head = nn.Dense(12, use_bias=False)

  def __call__(self, ids):
    h = self.body(self.embed(ids))
    return self.lm_head.apply({"params": {"kernel": self.embed.embedding.T}}, h)


IDS_12 = jnp.arange(6).reshape(2, 3)


def test_tied_head_called_through_apply_is_not_a_layer():
  base = TiedHead().init(jax.random.key(0), IDS_12)["params"]
  assert lj.targets(TiedHead(), None, IDS_12) == ["body"]
  assert lj.targets(TiedHead(), lj.LoRAConfig(), IDS_12) == ["body"]
  model = lj.inject(TiedHead(), lj.LoRAConfig(rank=2))
  params = lj.init_adapters(model, base, jax.random.key(1), IDS_12)
  assert set(lj.split(params)[0]) == {"body"}
  np.testing.assert_array_equal(model.apply({"params": params}, IDS_12),
                                TiedHead().apply({"params": base}, IDS_12))
  with pytest.raises(ValueError, match="target 'lm_head' names 'lm_head' \\(Dense\\), which the "
                     "model calls through .apply with explicit params"):
    lj.targets(TiedHead(), lj.LoRAConfig(targets=["lm_head"]), IDS_12)


def test_hugging_face_tied_head_is_never_selected(allow_rank_promotion):
  """Flax BERT's masked-LM decoder is `decoder.apply({'params': {'kernel': embedding.T}}, h)`."""
  transformers = pytest.importorskip("transformers")
  from transformers.models.bert.modeling_flax_bert import FlaxBertForMaskedLMModule
  config = transformers.BertConfig(vocab_size=64, hidden_size=16, num_hidden_layers=1,
                                   num_attention_heads=2, intermediate_size=32)
  module = FlaxBertForMaskedLMModule(config, dtype=jnp.float32)
  ids = jnp.arange(8).reshape(1, 8)
  args = (ids, jnp.ones_like(ids), jnp.zeros_like(ids), jnp.arange(8)[None], None)
  found = lj.targets(module, lj.LoRAConfig(), *args)
  assert "" not in found and len(found) == 7  # q, k, v, o, intermediate, output, transform
  base = jax.jit(module.init)(jax.random.key(0), *args)["params"]
  model = lj.inject(module, lj.LoRAConfig(rank=2))
  params = jax.jit(lambda b: lj.init_adapters(model, b, jax.random.key(1), *args))(base)
  logits = lambda m, p: jax.jit(lambda p: m.apply({"params": p}, *args).logits)(p)
  # Compiled, the two programs may fuse differently: equal up to float rounding.
  np.testing.assert_allclose(logits(model, params), logits(module, base), rtol=1e-5, atol=1e-6)


class ScaledDense(nn.Dense):
  """A Dense subclass with its own call that never reaches nn.Dense.__call__."""

  @nn.compact
  def __call__(self, x):
    kernel = self.param("kernel", nn.initializers.lecun_normal(), (x.shape[-1], self.features))
    return 2.0 * x @ kernel


class Wrapped(nn.Dense):
  """A subclass whose own call goes through nn.Dense's: adapted as a Dense."""

  def __call__(self, x):
    return super().__call__(x) * 2.0


class Custom(nn.Module):
  @nn.compact
  def __call__(self, x):
    return ScaledDense(8, name="scaled")(Wrapped(8, name="wrapped")(nn.Dense(8, name="plain")(x)))


def test_subclass_with_its_own_call_is_never_reported_selected():
  x = jnp.ones((2, 8))
  assert lj.targets(Custom(), None, x) == ["plain", "wrapped"]
  assert lj.targets(Custom(), lj.LoRAConfig(), x) == ["plain", "wrapped"]
  for targets in (["scaled"], "scaled"):
    with pytest.raises(ValueError, match="'scaled' is a ScaledDense \\(an nn.Dense whose own "
                       "__call__ does not call nn.Dense.__call__\\).*exclude it"):
      lj.inject(Custom(), lj.LoRAConfig(targets=targets)).init(jax.random.key(0), x)
  params = lj.inject(Custom(), lj.LoRAConfig(targets=".*", exclude=["scaled"])).init(
      jax.random.key(0), x)["params"]
  assert set(lj.split(params)[0]) == {"plain", "wrapped"}


@pytest.mark.parametrize("config, message", [
    (lj.LoRAConfig(exclude=["layers_9"]), "exclude rule 'layers_9' matches no linear layer; "
     "linear layers of this model: layers_\\*"),
    (lj.LoRAConfig(exclude=["layers_.*"]), "exclude rule 'layers_.\\*' matches no linear layer"),
    (lj.LoRAConfig(exclude="layers_9"), "exclude rule 'layers_9' matches no linear layer"),
    (lj.LoRAConfig(rank_pattern={"layers_7": 2}), "rank_pattern key 'layers_7' matches no layer "
     "the config selects"),
    (lj.LoRAConfig(exclude=["layers_0"], rank_pattern={"layers_0": 2}),
     "rank_pattern key 'layers_0' matches no layer the config selects"),
    (lj.LoRAConfig(alpha_pattern={"layer_1": 2.0}), "alpha_pattern key 'layer_1' matches no layer"),
    (lj.LoRAConfig(trainable=["layers_1/bais"]), "trainable rule 'layers_1/bais' matches no param; "
     "params of this model: layers_0/bias"),
])
def test_every_rule_that_matches_nothing_raises(config, message):
  mlp = nn.Sequential([nn.Dense(4), nn.relu, nn.Dense(4), nn.Dense(2)])
  x = jnp.ones((1, 3))
  with pytest.raises(ValueError, match=message):
    lj.targets(mlp, config, x)
  with pytest.raises(ValueError, match=message):
    lj.inject(mlp, config).init(jax.random.key(0), x)


class Normed(nn.Module):
  @nn.compact
  def __call__(self, x, train: bool = False):
    x = nn.Dense(8, name="up")(x)
    return nn.BatchNorm(use_running_average=not train, name="norm")(x)


def test_init_adapters_keeps_other_collections():
  x = host_random.normal(2, (4, 3))
  variables = Normed().init(jax.random.key(0), x)
  variables = {"params": variables["params"],
               "batch_stats": jax.tree.map(lambda s: s + 0.5, variables["batch_stats"])}
  model = lj.inject(Normed(), lj.LoRAConfig(rank=2))
  alone = lj.init_adapters(model, variables["params"], jax.random.key(1), x)  # params in, params out
  for train in (False, True):  # training mode would update the statistics: they stay as given
    out = lj.init_adapters(model, variables, jax.random.key(1), x, train=train)
    assert set(out) == {"params", "batch_stats"}
    assert out["batch_stats"] is variables["batch_stats"]
    assert jax.tree.map(jnp.shape, lj.split(out["params"])[0]) == {
        "up": {"lora_a": (3, 2), "lora_b": (2, 8)}}
  np.testing.assert_array_equal(model.apply(out, x), Normed().apply(variables, x))
  chex.assert_trees_all_equal(alone, out["params"])


class Inner(nn.Module):
  @nn.compact
  def __call__(self, x):
    return nn.Dense(4, name="head")(nn.Dense(4, name="dense")(x))


class Outer(nn.Module):
  inner: nn.Module

  @nn.compact
  def __call__(self, x):
    return self.inner(x)


def test_rules_see_full_paths_in_a_model_injected_inside_another():
  config = lj.LoRAConfig(rank=2, targets=["inner/dense"], trainable=["inner/head"])
  params = Outer(lj.inject(Inner(), config)).init(jax.random.key(0), jnp.ones((1, 3)))["params"]
  assert lj.count(params, config) == {"lora": 14, "trainable": 20, "frozen": 16}


def test_excluding_what_is_never_adapted_is_allowed():
  """PEFT users exclude `lm_head` out of habit, tied or not; and rules may overlap."""
  x = jnp.ones((2, 8))
  assert lj.targets(TiedHead(), lj.LoRAConfig(exclude=["lm_head"]), IDS_12) == ["body"]
  assert lj.targets(Custom(), lj.LoRAConfig(targets=".*"), x) == ["plain", "wrapped"]
  with pytest.raises(ValueError, match="exclude rule 'norm' names 'norm' \\(BatchNorm\\), not a "
                     "linear layer"):
    lj.targets(Normed(), lj.LoRAConfig(exclude=["norm"]), x)
  mlp = nn.Sequential([nn.Dense(4), nn.Dense(2)])
  covered = lj.LoRAConfig(trainable=[".*", "layers_1"])  # the second is covered by the first
  assert lj.targets(mlp, covered, x) == ["layers_0", "layers_1"]
