"""The optimizer: one `tx` over every trained leaf, frozen leaves stateless, LoRA+."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import lora_jax as lj
from lora_jax import bases, checkpoint, recipe, run
from lora_jax.models.llama import Llama, LlamaConfig
from tests.test_tree import MLP  # LoRA layers, a LayerNorm and a head

HEAD = lj.LoRAConfig(trainable=["head"])


@pytest.fixture(scope="module")
def params():
  return MLP().init(jax.random.key(0), jnp.ones((1, 8)))["params"]


def _grads(tree, seed=1, size=3.0):
  """Random gradients, large enough that a global norm of 1 clips them."""
  rng = np.random.default_rng(seed)
  return jax.tree.map(lambda l: jnp.asarray(size * rng.standard_normal(l.shape), l.dtype), tree)


def _trained(tree, config):
  return lj.split(tree, config)[0]


def _assert_frozen_zero(updates, config):
  for label, u in zip(jax.tree.leaves(lj.partition(updates, config)), jax.tree.leaves(updates)):
    if label == "frozen":
      assert not np.any(u)


def _assert_trees_equal(a, b):
  assert jax.tree.structure(a) == jax.tree.structure(b)
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    np.testing.assert_array_equal(x, y)


@pytest.mark.parametrize("inner", [optax.sgd(1.0), optax.adam(0.1)], ids=["sgd", "adam"])
def test_global_norm_clipping_sees_every_trained_leaf(params, inner):
  """Adapters and a trainable head are clipped together, as `tx` on them alone."""
  tx = optax.chain(optax.clip_by_global_norm(1.0), inner)
  grads = _grads(params)
  ref, _ = tx.update(_trained(grads, HEAD), tx.init(_trained(params, HEAD)),
                     _trained(params, HEAD))
  for ratio in (None, 1.0):
    opt = lj.optimizer(tx, params, HEAD, lora_plus_ratio=ratio)
    updates, _ = opt.update(grads, opt.init(params), params)
    _assert_frozen_zero(updates, HEAD)
    _assert_trees_equal(_trained(updates, HEAD), ref)


def test_clipped_sgd_update_has_norm_one(params):
  tx = optax.chain(optax.clip_by_global_norm(1.0), optax.sgd(1.0))
  opt = lj.optimizer(tx, params, HEAD)
  updates, _ = opt.update(_grads(params), opt.init(params), params)
  np.testing.assert_allclose(float(optax.tree.norm(updates)), 1.0, rtol=1e-6)


@pytest.mark.parametrize("config, ratio", [(HEAD, None), (None, 16.0)], ids=["head", "lora+"])
def test_apply_if_finite_skips_every_leaf_for_one_nan(params, config, ratio):
  tx = optax.apply_if_finite(optax.sgd(0.1), 3)
  opt = lj.optimizer(tx, params, config, lora_plus_ratio=ratio)
  grads = jax.tree.map(jnp.ones_like, params)
  grads["hidden_1"]["lora_b"] = grads["hidden_1"]["lora_b"].at[0, 0].set(jnp.nan)
  updates, state = opt.update(grads, opt.init(params), params)
  assert all(not np.any(u) for u in jax.tree.leaves(updates))  # lora_a is skipped too
  assert int(optax.tree.get(state, "notfinite_count")) == 1
  assert int(optax.tree.get(state, "total_notfinite")) == 1
  # The next finite step updates every trained leaf and resets the count.
  updates, state = opt.update(jax.tree.map(jnp.ones_like, params), state, params)
  assert int(optax.tree.get(state, "notfinite_count")) == 0
  assert float(updates["hidden_0"]["lora_a"][0, 0]) == pytest.approx(-0.1)


def test_schedule_counts_each_update_once(params):
  """One step count and one learning rate for all trained leaves, as `tx` on them alone."""
  tx = optax.inject_hyperparams(optax.sgd)(learning_rate=optax.linear_schedule(1.0, 0.0, 4))
  opt = lj.optimizer(tx, params, HEAD, lora_plus_ratio=2.0)
  state, ref_state = opt.init(params), tx.init(_trained(params, HEAD))
  for step in range(3):
    grads = _grads(params, seed=step)
    updates, state = opt.update(grads, state, params)
    ref, ref_state = tx.update(_trained(grads, HEAD), ref_state, _trained(params, HEAD))
    np.testing.assert_array_equal(updates["hidden_0"]["lora_a"], ref["hidden_0"]["lora_a"])
    np.testing.assert_array_equal(updates["head"]["kernel"], ref["head"]["kernel"])
    np.testing.assert_array_equal(updates["hidden_0"]["lora_b"], 2 * ref["hidden_0"]["lora_b"])
  counts = lambda s: [int(v) for _, v in optax.tree.get_all_with_path(s, "count")]
  assert counts(state) == counts(ref_state) == [3, 3]  # the step's and the schedule's
  is_value = lambda _, v: isinstance(v, jax.Array)
  assert float(optax.tree.get(state, "learning_rate", filtering=is_value)) == 0.5  # step 3's


def test_lora_plus_gives_b_rate_to_lora_b_magnitudes_and_vectors():
  """As PEFT: lora_b, DoRA magnitudes and trained 1-D params get B's rate; 2-D kernels A's."""
  params = MLP(use_dora=True).init(jax.random.key(0), jnp.ones((1, 8)))["params"]
  config = lj.LoRAConfig(trainable=["head", "norm"])
  grads = _grads(params)
  plain = lj.optimizer(optax.sgd(0.1), params, config)
  ref, _ = plain.update(grads, plain.init(params), params)

  def scaled(**kw):
    opt = lj.optimizer(optax.sgd(0.1), params, config, lora_plus_ratio=16, **kw)
    updates, _ = opt.update(grads, opt.init(params), params)
    _assert_frozen_zero(updates, config)
    return updates

  updates = scaled()
  b_rate = [("hidden_0", "lora_b"), ("hidden_1", "lora_magnitude"), ("head", "bias"),
            ("norm", "scale"), ("norm", "bias")]
  for layer, name in b_rate:
    np.testing.assert_array_equal(updates[layer][name], 16 * ref[layer][name])
  for layer, name in [("hidden_0", "lora_a"), ("head", "kernel")]:
    np.testing.assert_array_equal(updates[layer][name], ref[layer][name])
  # Restricted to lora_b, everything else keeps A's rate.
  updates = scaled(lora_plus_vectors=False)
  np.testing.assert_array_equal(updates["hidden_1"]["lora_b"], 16 * ref["hidden_1"]["lora_b"])
  for layer, name in b_rate[1:] + [("hidden_0", "lora_a"), ("head", "kernel")]:
    np.testing.assert_array_equal(updates[layer][name], ref[layer][name])


def test_lora_plus_finds_vectors_stacked_by_scan():
  """Under `nn.scan` a bias or DoRA magnitude is 2-D; its name puts it in B's group."""
  tree = {"layers": {"kernel": jnp.ones((3, 4, 4)), "bias": jnp.ones((3, 4)),
                     "lora_a": jnp.ones((3, 4, 2)), "lora_b": jnp.ones((3, 2, 4)),
                     "lora_magnitude": jnp.ones((3, 4))},
          "embed": {"embedding": jnp.ones((10, 4))}}
  config = lj.LoRAConfig(trainable=["layers/bias", "embed"])
  opt = lj.optimizer(optax.sgd(1.0), tree, config, lora_plus_ratio=4.0)
  updates, _ = opt.update(jax.tree.map(jnp.ones_like, tree), opt.init(tree), tree)
  rates = jax.tree.map(lambda u: float(-u.reshape(-1)[0]), updates)
  assert rates == {"layers": {"kernel": 0.0, "bias": 4.0, "lora_a": 1.0, "lora_b": 4.0,
                              "lora_magnitude": 4.0}, "embed": {"embedding": 1.0}}


def test_frozen_leaves_get_zero_updates_and_no_state(params):
  """The optimizer state is exactly `tx`'s state for the trained leaves alone."""
  tx = optax.adamw(1e-2)
  ref = tx.init(_trained(params, HEAD))
  nbytes = lambda state: sum(l.nbytes for l in jax.tree.leaves(state))
  for ratio in (None, 16.0):
    opt = lj.optimizer(tx, params, HEAD, lora_plus_ratio=ratio)
    state = opt.init(params)
    assert len(jax.tree.leaves(state)) == len(jax.tree.leaves(ref))
    assert nbytes(state) == nbytes(ref)
    updates, _ = opt.update(_grads(params), state, params)
    _assert_frozen_zero(updates, HEAD)


def test_optimizer_trains_only_adapters():
  """50 AdamW steps: frozen leaves bit-identical, every adapter leaf moved, loss down."""
  model = MLP()
  x = jax.random.normal(jax.random.key(1), (64, 8))
  y = jnp.sin(x.sum(-1, keepdims=True))
  params = model.init(jax.random.key(0), x)["params"]
  tx = lj.optimizer(optax.adamw(1e-2), params)
  state = tx.init(params)
  # No optimizer state for frozen leaves: Adam moments exist for adapters only.
  n_state = sum(l.size for l in jax.tree.leaves(state) if jnp.ndim(l) > 0)
  assert n_state == 2 * lj.count(params)["lora"]

  def loss_fn(p):
    return jnp.mean((model.apply({"params": p}, x) - y) ** 2)

  @jax.jit
  def step(p, s):
    loss, grads = jax.value_and_grad(loss_fn)(p)
    updates, s = tx.update(grads, s, p)
    return optax.apply_updates(p, updates), s, loss

  new, losses = params, []
  for _ in range(50):
    new, state, loss = step(new, state)
    losses.append(float(loss))
  assert losses[-1] < 0.7 * losses[0]
  labels = lj.partition(params)
  for label, old, now in zip(jax.tree.leaves(labels), jax.tree.leaves(params),
                             jax.tree.leaves(new)):
    if label == "frozen":
      np.testing.assert_array_equal(np.asarray(now).view(np.uint32),
                                    np.asarray(old).view(np.uint32))
    else:
      assert not np.array_equal(now, old)


def test_optimizer_trains_trainable_params_too(params):
  config = lj.LoRAConfig(trainable=["head"])
  tx = lj.optimizer(optax.sgd(1.0), params, config)
  grads = jax.tree.map(jnp.ones_like, params)
  updates, _ = tx.update(grads, tx.init(params), params)
  assert float(updates["head"]["kernel"][0, 0]) == -1.0
  assert float(updates["hidden_0"]["lora_a"][0, 0]) == -1.0
  assert not np.any(updates["hidden_0"]["kernel"]) and not np.any(updates["norm"]["scale"])


def test_lora_plus_scales_b_learning_rate(params):
  grads = jax.tree.map(jnp.ones_like, params)
  tx = lj.optimizer(optax.adam(0.1), params, lora_plus_ratio=16)
  updates, _ = tx.update(grads, tx.init(params), params)
  plain = lj.optimizer(optax.adam(0.1), params)
  ref, _ = plain.update(grads, plain.init(params), params)
  np.testing.assert_allclose(updates["hidden_0"]["lora_b"], 16 * ref["hidden_0"]["lora_b"],
                             rtol=1e-6)
  np.testing.assert_array_equal(updates["hidden_0"]["lora_a"], ref["hidden_0"]["lora_a"])
  with pytest.raises(ValueError, match="lora_plus_ratio=0"):
    lj.optimizer(optax.adam(0.1), params, lora_plus_ratio=0)


def test_lora_plus_b_group_holds_trained_leaves_only():
  """Frozen leaves stay frozen under LoRA+, whatever their name or shape."""
  tree = {"layer": {"kernel": jnp.ones((2, 2)), "bias": jnp.ones((2,)),
                    "lora_a": jnp.ones((2, 1)), "lora_b": jnp.ones((1, 2))},
          "x_lora_b": jnp.ones((2,))}
  tx = lj.optimizer(optax.sgd(1.0), tree, lora_plus_ratio=4.0)
  updates, _ = tx.update(jax.tree.map(jnp.ones_like, tree), tx.init(tree), tree)
  assert not np.any(updates["x_lora_b"])  # frozen, whatever its name ends with
  assert not np.any(updates["layer"]["bias"])  # a frozen vector
  np.testing.assert_array_equal(updates["layer"]["lora_b"], -4.0)
  np.testing.assert_array_equal(updates["layer"]["lora_a"], -1.0)


def test_optimizer_refuses_params_without_adapters():
  plain = MLP(dense=nn.Dense).init(jax.random.key(0), jnp.ones((1, 8)))["params"]
  with pytest.raises(ValueError, match="no adapter leaves.*train nothing"):
    lj.optimizer(optax.adam(1e-3), plain)


def test_optimizer_refuses_trainable_rule_matching_nothing(params):
  with pytest.raises(ValueError, match="trainable rule 'classifer' matches no param"):
    lj.optimizer(optax.adam(1e-3), params, lj.LoRAConfig(trainable=["classifer"]))


def test_run_config_lora_plus_ratio_scales_b_learning_rate(tmp_path):
  """`lora-jax train train.lora_plus_ratio=16`: B moves 16x the learning rate.

  Two steps from warm-up (the first at learning rate 0): Adam's second update
  is at most ~1.0014 x the learning rate per entry, and nearly that where the
  two gradients agree; B starts at zero, so its largest entry is ~16 x lr.
  """
  # A one-layer byte-level model: the run compiles in seconds.
  llama = LlamaConfig(vocab_size=320, hidden_size=32, intermediate_size=64, num_layers=1,
                      num_heads=2, num_kv_heads=1, max_position_embeddings=64)
  base = Llama(llama).init(jax.random.key(0), jnp.zeros((1, 8), jnp.int32))["params"]
  bases.save_model(tmp_path / "model", llama, base)
  lr = 0.001
  cfg = recipe.load(None, [
      f"model.base={tmp_path / 'model'}", "lora.targets=[q_proj]", "mesh.data=-1",
      "mesh.fsdp=1", "data.train=builtin:devil", "data.seq_len=16", "train.batch_size=8",
      "train.steps=2", "train.warmup_steps=0", f"train.learning_rate={lr}",
      "train.eval_every=0", "train.eval_batches=1", "train.save_every=100",
      "train.lora_plus_ratio=16", f"output_dir={tmp_path / 'run'}"])
  result = run.train_run(cfg, progress=False, log=lambda _: None)
  adapters, _ = checkpoint.load_adapter(result["adapter"])
  b = float(np.abs(adapters["layers_0"]["self_attn"]["q_proj"]["lora_b"]).max())
  assert 15 * lr < b < 16.1 * lr, b / lr  # without LoRA+: ~1 x lr
