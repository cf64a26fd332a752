"""Weighted adapters (`lora_jax.arithmetic`) against references computed here in numpy.

Every reference is the explicit weighted sum `sum_i w_i * s_i * A_i @ B_i`
(scales written out by hand), or PEFT's merge_utils semantics written again
in numpy on those deltas; nothing is computed through the module under test.
"""

import copy
import json
import math
import warnings
import zlib

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import lora_jax as lj
from lora_jax import hf
from lora_jax.arithmetic import METHODS, WeightedAdapter, weighted_adapter

X_IN = np.random.default_rng(0).normal(size=(2, 5)).astype(np.float32)
MODEL = nn.Sequential([nn.Dense(6), nn.relu, nn.Dense(4), nn.relu, nn.Dense(3)])
SHAPES = {"layers_0": (5, 6), "layers_2": (6, 4), "layers_4": (4, 3)}


def make(ranks, seed):
  """A tree of random A (in, r) and B (r, out) of `MODEL`'s layers: `ranks` maps a path to
  its rank."""
  rng = np.random.default_rng(seed)
  return {path: {"lora_a": (0.5 * rng.normal(size=(SHAPES[path][0], r))).astype(np.float32),
                 "lora_b": (0.5 * rng.normal(size=(r, SHAPES[path][1]))).astype(np.float32)}
          for path, r in ranks.items()}


def factors(tree, prefix=""):
  """path -> (A, B) in float64, by walking the tree here."""
  out = {}
  for key, value in tree.items():
    path = f"{prefix}/{key}" if prefix else key
    if isinstance(value, dict) and "lora_a" in value:
      out[path] = tuple(np.asarray(value[k], np.float64) for k in ("lora_a", "lora_b"))
    elif isinstance(value, dict):
      out.update(factors(value, path))
  return out


def deltas(tree, scales):
  """path -> scale * A @ B (batched over a leading layer axis)."""
  return {p: scales[p] * np.matmul(a, b) for p, (a, b) in factors(tree).items()}


def weighted(pairs, weights):
  """The exact weighted delta: sum_i w_i * s_i * A_i @ B_i, zero where an adapter is absent."""
  out = {}
  for (tree, scales), w in zip(pairs, weights):
    for p, d in deltas(tree, scales).items():
      out[p] = out.get(p, 0) + w * d
  return out


def result_deltas(result: WeightedAdapter):
  for path in factors(result.adapters):
    assert result.config.scale(path) == 1.0
  return deltas(result.adapters, {p: 1.0 for p in factors(result.adapters)})


def close(got, want, tol=1e-5):
  assert set(got) == set(want)
  for p in want:
    scale = max(1.0, float(np.abs(want[p]).max()))
    np.testing.assert_allclose(got[p], want[p], atol=tol * scale, rtol=0, err_msg=p)


# X: rsLoRA, rank 2 (3 on layers_2); Y: plain, rank 4, alpha 2 (8 on layers_4).
X_CONFIG = lj.LoRAConfig(rank=2, alpha=4, use_rslora=True, targets=["layers_0", "layers_2"],
                         rank_pattern={"layers_2": 3})
Y_CONFIG = lj.LoRAConfig(rank=4, alpha=2, targets=["layers_2", "layers_4"],
                         alpha_pattern={"layers_4": 8})
X = make({"layers_0": 2, "layers_2": 3}, seed=1)
Y = make({"layers_2": 4, "layers_4": 4}, seed=2)
X_SCALES = {"layers_0": 4 / math.sqrt(2), "layers_2": 4 / math.sqrt(3)}
Y_SCALES = {"layers_2": 2 / 4, "layers_4": 8 / 4}
PAIRS = [(X, X_CONFIG), (Y, Y_CONFIG)]
WEIGHTS = [0.7, -1.3]
EXACT = weighted([(X, X_SCALES), (Y, Y_SCALES)], WEIGHTS)


@pytest.fixture(scope="module")
def base():
  return MODEL.init(jax.random.key(0), X_IN)["params"]


def plain_output(base, delta):
  params = jax.tree.map(lambda x: x, base)
  for path, d in delta.items():
    params[path] = dict(params[path], kernel=np.asarray(base[path]["kernel"]) + d)
  return MODEL.apply({"params": params}, X_IN)


# --- cat ----------------------------------------------------------------------

def test_cat_is_the_exact_weighted_sum_with_each_adapters_own_scale():
  result = weighted_adapter(PAIRS, WEIGHTS, method="cat")
  close(result_deltas(result), EXACT)
  assert {p: a.shape[1] for p, (a, _) in factors(result.adapters).items()} == {
      "layers_0": 2, "layers_2": 7, "layers_4": 4}
  assert result.energy_kept == {"layers_0": 1.0, "layers_2": 1.0, "layers_4": 1.0}
  assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(result.adapters))


def test_result_config_is_plain_lora_selecting_exactly_its_layers():
  config = weighted_adapter(PAIRS, WEIGHTS, method="cat").config
  assert (config.use_rslora, config.use_dora, config.dropout_rate, config.trainable,
          config.exclude, config.init) == (False, False, 0.0, (), (), "default")
  assert all(config.selects(p) for p in SHAPES)
  assert not any(map(config.selects, ["layers_1", "x/layers_0", "layers_0/x", "layers_44"]))
  assert [config.rank_for(p) for p in SHAPES] == [2, 7, 4]
  assert lj.LoRAConfig.from_json(config.to_json()) == config
  # A nested layer whose path ends like an adapted one is not selected.
  nested = nn.Sequential([nn.Dense(6), nn.relu, nn.Dense(4), nn.Sequential([nn.Dense(3)])])
  only = weighted_adapter([(make({"layers_0": 2}, 0), lj.LoRAConfig(rank=2))], [1.0])
  assert lj.targets(nested, only.config, X_IN) == ["layers_0"]


@pytest.mark.parametrize("method, rank", [("cat", None), ("svd", 7)])
def test_result_runs_in_inject_and_merges_as_base_plus_weighted_delta(base, method, rank):
  result = weighted_adapter(PAIRS, WEIGHTS, method=method, rank=rank)
  params = lj.combine(result.adapters, base)
  got = lj.inject(MODEL, result.config).apply({"params": params}, X_IN)
  np.testing.assert_allclose(got, plain_output(base, EXACT), atol=1e-4, rtol=1e-5)
  merged = lj.merge(params, result.config)
  for path in SHAPES:
    np.testing.assert_allclose(merged[path]["kernel"], base[path]["kernel"] + EXACT[path],
                               atol=1e-4, rtol=0)


@pytest.mark.parametrize("method, rank", [("cat", None), ("linear", None), ("svd", 3)])
def test_negation_merges_back_to_the_base(base, method, rank):
  result = weighted_adapter([(X, X_CONFIG), (X, X_CONFIG)], [1, -1], method=method, rank=rank)
  merged = lj.merge(lj.combine(result.adapters, base), result.config)
  for path in ("layers_0", "layers_2"):
    np.testing.assert_allclose(merged[path]["kernel"], base[path]["kernel"], atol=1e-6, rtol=0)


# --- svd ------------------------------------------------------------------------

def test_svd_with_rank_covering_the_sum_of_ranks_is_exact():
  result = weighted_adapter(PAIRS, WEIGHTS, method="svd", rank=7)
  close(result_deltas(result), EXACT)
  assert result.energy_kept == pytest.approx({p: 1.0 for p in SHAPES}, abs=1e-6)
  # Never wider than the matrices: min(7, fan_in, fan_out).
  assert [result.config.rank_for(p) for p in SHAPES] == [5, 4, 3]


def test_svd_truncation_keeps_numpys_energy_split_evenly():
  result = weighted_adapter(PAIRS, WEIGHTS, method="svd", rank=2)
  got = result_deltas(result)
  for path, delta in EXACT.items():
    u, s, vh = np.linalg.svd(delta)
    assert result.energy_kept[path] == pytest.approx((s[:2] ** 2).sum() / (s ** 2).sum(),
                                                     rel=1e-5)
    np.testing.assert_allclose(got[path], (u[:, :2] * s[:2]) @ vh[:2], atol=1e-4, rtol=0)
    a, b = factors(result.adapters)[path]  # sqrt(S) on each side
    np.testing.assert_allclose(np.linalg.norm(a, axis=0), np.linalg.norm(b, axis=1), rtol=1e-4)


# --- pruning methods: PEFT's merge_utils in numpy ------------------------------------

def magnitude(t, density):
  if density >= 1:
    return t
  k = int(density * t.size)
  keep = np.zeros(t.size, bool)
  keep[np.argsort(-np.abs(t).ravel(), kind="stable")[:k]] = True
  return t * keep.reshape(t.shape)


def dare_mask(seed, path, index, density, shape):
  """The documented contract: fold_in(fold_in(key(seed), crc32(path)), index)."""
  key = jax.random.fold_in(jax.random.fold_in(jax.random.key(seed), zlib.crc32(path.encode())),
                           index)
  return np.asarray(jax.random.bernoulli(key, density, shape))


def merge_utils(method, tasks, weights, density, sign, seed, path, indices):
  if method in ("ties", "magnitude_prune"):
    tasks = [magnitude(t, density) for t in tasks]
  elif method.startswith("dare") and density < 1:
    tasks = [t * dare_mask(seed, path, i, density, t.shape) / density
             for t, i in zip(tasks, indices)]
  tasks = np.stack(tasks)
  w = np.asarray(weights).reshape(-1, *[1] * (tasks.ndim - 1))
  if method in ("dare_linear", "magnitude_prune"):
    return (tasks * w).sum(0)
  votes = tasks.sum(0) if sign == "total" else np.sign(tasks).sum(0)
  agree = np.sign(tasks) == np.where(votes >= 0, 1, -1)
  return (tasks * w * agree).sum(0) / np.maximum(agree.sum(0), 1)


# Both adapters on one layer: what the pruning methods act on.
SHARED = [({"layers_2": X["layers_2"]}, X_CONFIG), ({"layers_2": Y["layers_2"]}, Y_CONFIG)]


def reference(method, density, sign="total", seed=0):
  tasks = [X_SCALES["layers_2"] * factors(X)["layers_2"][0] @ factors(X)["layers_2"][1],
           Y_SCALES["layers_2"] * factors(Y)["layers_2"][0] @ factors(Y)["layers_2"][1]]
  return {"layers_2": merge_utils(method, tasks, WEIGHTS, density, sign, seed, "layers_2",
                                  [0, 1])}


@pytest.mark.parametrize("method, sign", [
    ("ties", "total"), ("ties", "frequency"), ("dare_linear", "total"),
    ("dare_ties", "frequency"), ("magnitude_prune", "total")])
def test_pruning_methods_are_peft_merge_utils_on_the_deltas(method, sign):
  want = reference(method, 0.4, sign, seed=3)
  result = weighted_adapter(SHARED, WEIGHTS, method=method, rank=4, density=0.4,
                            majority_sign=sign, seed=3)
  close(result_deltas(result), want)  # rank 4 covers the (6, 4) layer: the target itself


def test_pruned_target_truncates_keeping_numpys_energy():
  want = reference("ties", 0.5)["layers_2"]
  result = weighted_adapter(SHARED, WEIGHTS, method="ties", rank=1, density=0.5)
  u, s, vh = np.linalg.svd(want)
  assert result.energy_kept["layers_2"] == pytest.approx(s[0] ** 2 / (s ** 2).sum(), rel=1e-4)
  np.testing.assert_allclose(result_deltas(result)["layers_2"], s[0] * np.outer(u[:, 0], vh[0]),
                             atol=1e-4)


def test_density_one_prunes_nothing():
  for method in ("dare_linear", "magnitude_prune"):
    result = weighted_adapter(SHARED, WEIGHTS, method=method, rank=4, density=1.0)
    close(result_deltas(result), {"layers_2": EXACT["layers_2"]})


def test_dare_is_deterministic_for_a_seed():
  run = lambda seed: weighted_adapter(SHARED, WEIGHTS, method="dare_ties", rank=4, density=0.4,
                                      majority_sign="frequency", seed=seed)
  same, again, other = run(7), run(7), run(8)
  for x, y in zip(jax.tree.leaves(same.adapters), jax.tree.leaves(again.adapters)):
    np.testing.assert_array_equal(x, y)
  assert not all(np.array_equal(x, y) for x, y in zip(jax.tree.leaves(same.adapters),
                                                       jax.tree.leaves(other.adapters)))


# --- linear -----------------------------------------------------------------------

def test_linear_is_peft_formula_and_one_adapter_gives_its_weighted_delta():
  z_config = lj.LoRAConfig(rank=3, alpha=5, targets=["layers_2"])
  z = make({"layers_2": 3}, seed=4)
  x_scale, z_scale = X_SCALES["layers_2"], 5 / 3
  result = weighted_adapter([(X, X_CONFIG), (z, z_config)], [0.7, -1.3], method="linear")
  (ax, bx), (az, bz) = factors(X)["layers_2"], factors(z)["layers_2"]
  a = math.sqrt(0.7 * x_scale) * ax - math.sqrt(1.3 * z_scale) * az  # sign on A's side
  b = math.sqrt(0.7 * x_scale) * bx + math.sqrt(1.3 * z_scale) * bz
  close(result_deltas(result), {"layers_0": 0.7 * deltas(X, X_SCALES)["layers_0"],
                                "layers_2": a @ b})
  assert not np.allclose(a @ b, 0.7 * x_scale * ax @ bx - 1.3 * z_scale * az @ bz, atol=1e-2)
  single = weighted_adapter([(Y, Y_CONFIG)], np.array([-0.5]), method="linear")
  close(result_deltas(single), {p: -0.5 * d for p, d in deltas(Y, Y_SCALES).items()})


# --- stacked (scanned) layers -----------------------------------------------------------

class Block(nn.Module):
  @nn.compact
  def __call__(self, x, _):
    return nn.tanh(nn.Dense(5, name="dense")(x)), None


class Stack(nn.Module):
  axis: int = 0

  @nn.compact
  def __call__(self, x):
    x = nn.Dense(5, name="embed")(x)
    scan = nn.scan(Block, variable_axes={"params": self.axis}, split_rngs={"params": True},
                   length=3, in_axes=nn.broadcast)
    x, _ = scan(name="layers")(x, None)
    return x


STACK_X = np.random.default_rng(1).normal(size=(2, 4)).astype(np.float32)


def stacked_pair(rank, alpha, seed, rslora=False, axis=0):
  """An adapter of `Stack(axis)`'s `layers/dense` (3 layers of (5, 5)) and its delta,
  layer axis first."""
  rng = np.random.default_rng(seed)
  a, b = rng.normal(size=(3, 5, rank)), rng.normal(size=(3, rank, 5))
  tree = {"layers": {"dense": {"lora_a": np.moveaxis(a, 0, axis).astype(np.float32),
                               "lora_b": np.moveaxis(b, 0, axis).astype(np.float32)}}}
  config = lj.LoRAConfig(rank=rank, alpha=alpha, use_rslora=rslora, targets=["dense"])
  return (tree, config), alpha / (math.sqrt(rank) if rslora else rank) * np.matmul(a, b)


def stack_output(base, delta):
  moved = jax.tree.map(lambda x: x, base)
  dense = base["layers"]["dense"]
  moved["layers"]["dense"] = dict(dense, kernel=dense["kernel"] + delta)
  return Stack().apply({"params": moved}, STACK_X)


def test_stacked_layers_cat_exact_and_svd_per_layer_slice():
  (p1, d1), (p2, d2) = stacked_pair(2, 4, 5, rslora=True), stacked_pair(1, 3, 6)
  exact = 1.5 * d1 + 0.5 * d2
  cat = weighted_adapter([p1, p2], [1.5, 0.5], method="cat")
  assert cat.adapters["layers"]["dense"]["lora_a"].shape == (3, 5, 3)
  close(result_deltas(cat), {"layers/dense": exact})
  svd = weighted_adapter([p1, p2], [1.5, 0.5], method="svd", rank=1)
  u, s, vh = np.linalg.svd(exact)  # one SVD per layer slice
  np.testing.assert_allclose(result_deltas(svd)["layers/dense"],
                             (u[..., :1] * s[:, None, :1]) @ vh[:, :1], atol=1e-4, rtol=0)
  assert svd.energy_kept["layers/dense"] == pytest.approx(
      (s[:, 0] ** 2).sum() / (s ** 2).sum(), rel=1e-5)


def test_stacked_result_runs_in_a_scanned_model():
  (p1, d1), (p2, d2) = stacked_pair(2, 4, 5, rslora=True), stacked_pair(1, 3, 6)
  base = Stack().init(jax.random.key(0), STACK_X)["params"]
  result = weighted_adapter([p1, p2], [1.5, -0.5], method="svd", rank=3)  # covers 2 + 1
  got = lj.inject(Stack(), result.config).apply(
      {"params": lj.combine(result.adapters, base)}, STACK_X)
  np.testing.assert_allclose(got, stack_output(base, 1.5 * d1 - 0.5 * d2), atol=1e-4)


@pytest.mark.parametrize("axis, rank", [(0, 3), (1, 2)])
def test_shapes_read_two_ways_are_refused_unless_layouts_say(axis, rank):
  # Layer axis 0 and rank 3 == 3 layers: (3, 5, 3) x (3, 3, 5) is also one DenseGeneral
  # from (3, 5) to (3, 5); layer axis 1: (5, 3, r) x (r, 3, 5) always is.
  pair, delta = stacked_pair(rank, 3, 5, axis=axis)
  with pytest.raises(ValueError, match=r"layers/dense.*2 ways.*layouts=lora_jax.layouts"):
    weighted_adapter([pair, pair], [1.0, 0.5], method="cat")
  layouts = lj.layouts(lj.inject(Stack(axis), pair[1]), STACK_X)
  result = weighted_adapter([pair, pair], [1.0, 0.5], method="cat", layouts=layouts)
  a, b = (np.moveaxis(np.asarray(result.adapters["layers"]["dense"][k]), axis, 0)
          for k in ("lora_a", "lora_b"))
  np.testing.assert_allclose(np.matmul(a, b), 1.5 * delta, atol=1e-5)


class Odd(nn.Module):
  """Layouts beyond (in, r) x (r, out): batch dims, and an einsum whose A and B keep every
  kernel axis."""

  @nn.compact
  def __call__(self, x):  # x: (2, 3, 4)
    y = nn.DenseGeneral(5, batch_dims=(0,), name="general")(x)  # kernel (2, 4, 5)
    return nn.Einsum((2, 5, 3), "btd,ndh->btnh", name="einsum")(y)  # kernel (2, 5, 3)


def odd_pair(rank, alpha, seed, rslora=False):
  """Odd's adapters: general A (2, 4, r), B (2, r, 5); einsum A (1, 5, 1, r), B (2, 1, 3, r)."""
  rng = np.random.default_rng(seed)
  ga, gb = 0.5 * rng.normal(size=(2, 4, rank)), 0.5 * rng.normal(size=(2, rank, 5))
  ea, eb = 0.5 * rng.normal(size=(1, 5, 1, rank)), 0.5 * rng.normal(size=(2, 1, 3, rank))
  tree = jax.tree.map(lambda v: v.astype(np.float32), {
      "general": {"lora_a": ga, "lora_b": gb}, "einsum": {"lora_a": ea, "lora_b": eb}})
  scale = alpha / (math.sqrt(rank) if rslora else rank)
  return (tree, lj.LoRAConfig(rank=rank, alpha=alpha, use_rslora=rslora)), odd_deltas(tree, scale)


def odd_deltas(tree, scale):
  (ga, gb), (ea, eb) = ([np.asarray(tree[n][k], np.float64) for k in ("lora_a", "lora_b")]
                        for n in ("general", "einsum"))
  return {"general": scale * np.matmul(ga, gb),
          "einsum": scale * np.einsum("dr,nhr->ndh", ea[0, :, 0], eb[:, 0])}


def test_other_layouts_read_from_shapes_match_the_recorded_ones():
  x = np.random.default_rng(2).normal(size=(2, 3, 4)).astype(np.float32)
  (p1, d1), (p2, d2) = odd_pair(2, 4, 0, rslora=True), odd_pair(1, 3, 1)
  exact = {n: 0.5 * d1[n] + 2.0 * d2[n] for n in d1}
  layouts = lj.layouts(lj.inject(Odd(), p1[1]), x)
  read = weighted_adapter([p1, p2], [0.5, 2.0], method="cat")
  told = weighted_adapter([p1, p2], [0.5, 2.0], method="cat", layouts=layouts)
  for a, b in zip(jax.tree.leaves(read.adapters), jax.tree.leaves(told.adapters)):
    np.testing.assert_array_equal(a, b)
  close(odd_deltas(read.adapters, 1.0), exact)
  svd = weighted_adapter([p1, p2], [0.5, 2.0], method="svd", rank=3)  # covers 2 + 1: exact
  close(odd_deltas(svd.adapters, 1.0), exact)
  base = Odd().init(jax.random.key(0), x)["params"]
  got = lj.inject(Odd(), read.config).apply({"params": lj.combine(read.adapters, base)}, x)
  moved = {n: dict(base[n], kernel=base[n]["kernel"] + exact[n]) for n in base}
  np.testing.assert_allclose(got, Odd().apply({"params": moved}, x), atol=1e-4)


# --- dtypes, export -----------------------------------------------------------------

def test_result_dtype_is_the_adapters_lora_dtype_or_float32_when_mixed():
  bf16 = lj.LoRAConfig(rank=2, alpha=4, targets=["layers_0"], lora_dtype="bfloat16")
  tree = jax.tree.map(lambda v: jnp.asarray(v, jnp.bfloat16), make({"layers_0": 2}, 0))
  same = weighted_adapter([(tree, bf16), (tree, bf16)], [1, 1], method="cat")
  assert same.config.lora_dtype == "bfloat16"
  assert {x.dtype for x in jax.tree.leaves(same.adapters)} == {jnp.dtype(jnp.bfloat16)}
  mixed = weighted_adapter([(tree, bf16), (X, X_CONFIG)], [1, 1], method="cat")
  assert mixed.config.lora_dtype == "float32"
  assert {x.dtype for x in jax.tree.leaves(mixed.adapters)} == {jnp.dtype(jnp.float32)}


LLAMA_SHAPES = {"q_proj": (32, 32), "v_proj": (32, 16), "down_proj": (48, 32)}


def llama_adapter(ranks, seed):
  """Adapters of the reference Llama's layers: `ranks` maps a module path to its rank."""
  rng, tree = np.random.default_rng(seed), {}
  for path, r in ranks.items():
    *parents, name = path.split("/")
    node = tree
    for key in parents:
      node = node.setdefault(key, {})
    fan_in, fan_out = LLAMA_SHAPES[name]
    node[name] = {"lora_a": rng.normal(size=(fan_in, r)).astype(np.float32),
                  "lora_b": rng.normal(size=(r, fan_out)).astype(np.float32)}
  return tree


def test_a_combined_llama_adapter_exports_to_peft_and_back(tmp_path):
  one = (llama_adapter({"layers_0/self_attn/q_proj": 2, "layers_1/mlp/down_proj": 2}, 0),
         lj.LoRAConfig(rank=2, alpha=4, use_rslora=True, targets=["q_proj", "down_proj"]))
  two = (llama_adapter({"layers_0/self_attn/q_proj": 3, "layers_1/self_attn/v_proj": 3}, 1),
         lj.LoRAConfig(rank=3, alpha=3, targets=["q_proj", "v_proj"]))
  result = weighted_adapter([one, two], [1.0, 0.5], method="cat")
  with warnings.catch_warnings():
    warnings.simplefilter("ignore", hf.ServingWarning)  # rank patterns: vLLM ignores them
    out = hf.export_peft(tmp_path / "peft", result.adapters, result.config)
  saved = json.loads((out / "adapter_config.json").read_text())
  assert (saved["use_rslora"], saved["use_dora"]) == (False, False)
  adapters, config = hf.import_peft(out)
  close(deltas(adapters, {p: config.scale(p) for p in factors(adapters)}),
        result_deltas(result))


# --- bad input --------------------------------------------------------------------

Z = make({"layers_2": 3}, seed=9)
Z["layers_2"]["lora_b"] = np.ones((3, 5), np.float32)  # layers_2 is (6, 4) in X
DORA = lj.LoRAConfig(rank=2, use_dora=True)
MAGNITUDE = {"layers_0": dict(X["layers_0"], lora_magnitude=np.ones(6, np.float32))}
KERNEL = {"layers_0": dict(X["layers_0"], kernel=np.ones((5, 6), np.float32))}
ONLY_A = {"layers_0": {"lora_a": X["layers_0"]["lora_a"]}}
X_Y = dict(adapters=PAIRS, weights=WEIGHTS)
BAD = [
    (dict(adapters=[], weights=[]), "no adapters given"),
    (dict(adapters=PAIRS, weights=[1.0]), "1 weights for 2 adapters"),
    (dict(adapters=PAIRS, weights=0.5), "no list of weights for 2 adapters"),
    (dict(adapters=PAIRS, weights=[1.0, float("nan")]), r"weights\[1\]=nan must be a finite"),
    (dict(adapters=PAIRS, weights=[float("inf"), 1.0]), r"weights\[0\]=inf"),
    (dict(X_Y, method="mean"), "unknown method 'mean'; known methods: " + ", ".join(METHODS)),
    (dict(X_Y, method="ties_svd", rank=2), "lora_jax's 'ties' is PEFT's 'ties_svd'"),
    (dict(X_Y, method="svd"), "'svd' truncates by SVD and needs rank="),
    (dict(X_Y, method="svd", rank=0), "rank=0 must be an integer >= 1"),
    (dict(X_Y, method="cat", rank=4), "sets the ranks itself"),
    (dict(X_Y, method="ties", rank=2), r"needs density= in \(0, 1\]"),
    (dict(X_Y, method="dare_ties", rank=2, density=0.0), r"density= in \(0, 1\].*got 0.0"),
    (dict(X_Y, method="magnitude_prune", rank=2, density=1.5), "got 1.5"),
    (dict(X_Y, method="svd", rank=2, density=0.5), "density= is only for"),
    (dict(X_Y, method="ties", rank=2, density=0.5, majority_sign="mean"),
     "unknown majority_sign 'mean'; known: total, frequency"),
    (dict(X_Y, method="svd", rank=2, majority_sign="frequency"), "only for ties and dare_ties"),
    (dict(X_Y, method="linear"),
     r"'linear' .* layer 'layers_2' has ranks adapters\[0\]: 3, adapters\[1\]: 4"),
    (dict(adapters=[(X, X_CONFIG), (Z, lj.LoRAConfig(rank=3))], weights=[1, 1]),
     r"layer 'layers_2' has adapters of different layer shapes.*\(6, 4\).*\(6, 5\)"),
    (dict(adapters=[(X, X_CONFIG), (X, DORA)], weights=[1, 1]),
     r"adapters\[1\] is a DoRA adapter \(its config has use_dora=True\).*not W \+ s\*A@B"),
    (dict(adapters=[(MAGNITUDE, X_CONFIG)], weights=[1]), "lora_magnitude at 'layers_0'"),
    (dict(adapters=[(KERNEL, X_CONFIG)], weights=[1]),
     "'layers_0/kernel', which is not an adapter leaf"),
    (dict(adapters=[(ONLY_A, X_CONFIG)], weights=[1]), "has lora_a but not the other"),
    (dict(adapters=[({}, X_CONFIG)], weights=[1]), "holds no adapters"),
    (dict(adapters=[X], weights=[1]), r"adapters\[0\] must be a pair"),
    (dict(adapters=[(X, Y_CONFIG)], weights=[1]),
     r"layer 'layers_0' has a rank-2 adapter but its config gives rank 4"),
    (dict(X_Y, layouts={}), "no record of layer 'layers_0'"),
    (dict(X_Y, seed=1.5), "seed=1.5 must be an integer"),
]


@pytest.mark.parametrize("kwargs, message", BAD, ids=[m[:40] for _, m in BAD])
def test_bad_input_is_a_clear_error_and_changes_nothing(kwargs, message):
  before = copy.deepcopy([X, Y, Z, MAGNITUDE, KERNEL])
  with pytest.raises(ValueError, match=message):
    weighted_adapter(**kwargs)
  for old, new in zip(jax.tree.leaves(before), jax.tree.leaves([X, Y, Z, MAGNITUDE, KERNEL])):
    np.testing.assert_array_equal(old, new)
