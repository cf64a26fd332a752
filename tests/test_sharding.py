"""Meshes, rules and shardings on 8 simulated devices."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax
import pytest
from jax.sharding import AxisType, NamedSharding, PartitionSpec as P

import lora_jax as lj
from lora_jax import sharding
from lora_jax.models.llama import Llama, config_for

MESHES = [(8, 1, 1), (2, 2, 2), (1, 2, 4)]
IDS = jnp.zeros((8, 8), jnp.int32)


def test_make_mesh_sizes_and_errors():
  assert sharding.make_mesh().shape == {"data": 1, "fsdp": 8, "tensor": 1}
  assert sharding.make_mesh(2, -1, 2).shape == {"data": 2, "fsdp": 2, "tensor": 2}
  assert sharding.make_mesh(-1, 1, 4).shape == {"data": 2, "fsdp": 1, "tensor": 4}
  with pytest.raises(ValueError, match=r"needs 12 devices, but there are 8"):
    sharding.make_mesh(3, 2, 2)
  with pytest.raises(ValueError, match="at most one axis may be -1"):
    sharding.make_mesh(-1, -1, 2)
  with pytest.raises(ValueError, match="8 devices do not divide by 3"):
    sharding.make_mesh(3, -1, 1)
  with pytest.raises(ValueError, match="tensor=0"):
    sharding.make_mesh(1, -1, 0)


@pytest.mark.parametrize("axis_type", [AxisType.Auto, AxisType.Explicit])
def test_shardings_work_on_auto_and_explicit_meshes(axis_type):
  mesh = sharding.make_mesh(2, 2, 2, axis_types=axis_type)
  assert set(mesh.axis_types) == {axis_type}
  layer = lj.LoRADense(8, kernel_init=nn.with_logical_partitioning(
      nn.initializers.lecun_normal(), ("embed", "mlp")))
  abstract = jax.eval_shape(layer.init, jax.random.key(0), jnp.ones((4, 8)))["params"]
  shardings = sharding.param_shardings(abstract, mesh)
  params = jax.device_put(nn.unbox(layer.init(jax.random.key(0), jnp.ones((4, 8)))["params"]),
                          shardings)
  assert params["kernel"].sharding.spec == P("fsdp", "tensor")
  assert params["lora_a"].sharding.spec == P("fsdp", None)
  assert params["lora_b"].addressable_shards[0].data.shape == (8, 4)  # (rank, 8 / tensor)


def _expected_spec(path: str, scanned: bool) -> P:
  """The specification, written out: kernels by their logical axes, adapters after them."""
  embed, tensor = "fsdp", "tensor"
  name, leaf = path.rsplit("/", 2)[-2:]
  module = path.split("/")
  kernel = {"q_proj": (embed, tensor), "k_proj": (embed, tensor), "v_proj": (embed, tensor),
            "gate_proj": (embed, tensor), "up_proj": (embed, tensor),
            "o_proj": (tensor, embed), "down_proj": (tensor, embed), "lm_head": (embed, tensor)}
  if leaf == "embedding":
    spec = (tensor, embed)
  elif leaf == "scale":
    spec = (None,)
  else:
    k_in, k_out = kernel[name]
    spec = {"kernel": (k_in, k_out), "lora_a": (k_in, None), "lora_b": (None, k_out),
            "lora_magnitude": (k_out,)}[leaf]
  layered = scanned and module[0] == "layers"
  return P(*((None,) if layered else ()), *spec)


@pytest.mark.parametrize("shape", MESHES, ids=str)
@pytest.mark.parametrize("scan", [False, True], ids=["layers_i", "scanned"])
def test_every_leaf_sharded_as_specified(shape, scan):
  model = lj.inject(Llama(config_for("tiny", scan_layers=scan)),
                    lj.LoRAConfig(rank=4, use_dora=True))
  abstract = jax.eval_shape(model.init, jax.random.key(0), IDS)["params"]
  shardings = sharding.param_shardings(abstract, sharding.make_mesh(*shape))
  checked = 0
  for kp, sh in jax.tree_util.tree_leaves_with_path(shardings):
    path = "/".join(k.key for k in kp)
    assert isinstance(sh, NamedSharding)
    assert sh.spec == _expected_spec(path, scan), path
    checked += 1
  n_layers = 1 if scan else 2
  assert checked == 3 + n_layers * (2 + 7 * 4)  # embedding, norm, head; per layer 2 norms + 7 adapted


def test_adapters_follow_their_kernel_even_without_their_own_names():
  """An adapter tree that lost its names (e.g. built unboxed) still follows the kernel."""
  init = nn.with_logical_partitioning(nn.initializers.lecun_normal(), ("embed", "mlp"))
  abstract = jax.eval_shape(lj.LoRADense(8, kernel_init=init).init, jax.random.key(0),
                            jnp.ones((2, 16)))["params"]
  abstract = dict(abstract, lora_a=nn.unbox(abstract["lora_a"]),
                  lora_b=nn.unbox(abstract["lora_b"]))
  specs = jax.tree.map(lambda s: s.spec, sharding.param_shardings(abstract,
                                                                  sharding.make_mesh(1, 2, 4)))
  assert (specs["lora_a"], specs["lora_b"]) == (P("fsdp", None), P(None, "tensor"))


def test_indivisible_dimension_is_named():
  init = nn.with_logical_partitioning(nn.initializers.lecun_normal(), ("embed", "mlp"))
  abstract = jax.eval_shape(nn.Dense(6, kernel_init=init, name="proj").init, jax.random.key(0),
                            jnp.ones((2, 8)))["params"]
  with pytest.raises(ValueError, match=r"'kernel' with shape \(8, 6\) cannot be sharded as "
                     r"P\('fsdp', 'tensor'\).*6 does not divide by 4"):
    sharding.param_shardings(abstract, sharding.make_mesh(1, 2, 4))


def test_optimizer_state_follows_params():
  mesh = sharding.make_mesh(1, 2, 4)
  params = {"layer": {"kernel": jax.ShapeDtypeStruct((8, 8), jnp.float32),
                      "lora_a": jax.ShapeDtypeStruct((8, 2), jnp.float32)}}
  shardings = {"layer": {"kernel": NamedSharding(mesh, P("fsdp", "tensor")),
                         "lora_a": NamedSharding(mesh, P("fsdp", None))}}
  tx = lj.optimizer(optax.adam(1e-3), params)
  state = sharding.follow_params(jax.eval_shape(tx.init, params), params, shardings, mesh)
  specs = {jax.tree_util.keystr(kp): s.spec for kp, s in jax.tree_util.tree_leaves_with_path(state)}
  adam = [v for k, v in specs.items() if "lora_a" in k]
  assert adam == [P("fsdp", None)] * 2  # mu and nu
  assert all(v == P() for k, v in specs.items() if "count" in k)


def test_collective_bytes_reads_compiled_hlo():
  mesh = sharding.make_mesh(1, 8, 1)
  x = jax.device_put(jnp.ones((8, 16)), NamedSharding(mesh, P("fsdp", None)))
  compiled = jax.jit(lambda a: jnp.sum(a, axis=0), out_shardings=NamedSharding(mesh, P())
                     ).lower(x).compile()
  counts = sharding.collective_bytes(compiled)
  assert counts.get("all-reduce", 0) == 16 * 4  # one f32[16] partial sum per device
  assert sharding.collective_bytes("no collectives here") == {}


def test_mesh_axis_names_are_used_as_they_are():
  """`nn.with_partitioning` names mesh axes, not logical ones: no rules apply."""
  init = nn.with_partitioning(nn.initializers.lecun_normal(), ("fsdp", "tensor"))
  abstract = jax.eval_shape(lj.LoRADense(8, kernel_init=init).init, jax.random.key(0),
                            jnp.ones((2, 8)))["params"]
  specs = jax.tree.map(lambda s: s.spec,
                       sharding.param_shardings(abstract, sharding.make_mesh(1, 2, 4)))
  assert specs["kernel"] == P("fsdp", "tensor") and specs["lora_a"] == P("fsdp", None)


def test_collective_bytes_counts_async_results_once():
  hlo = """
  %ag = (f32[4,8]{1,0}, f32[32,8]{1,0}) all-gather-start(f32[4,8]{1,0} %p), dimensions={0}
  %agd = f32[32,8]{1,0} all-gather-done((f32[4,8]{1,0}, f32[32,8]{1,0}) %ag)
  %cp = (f32[16]{0}, f32[16]{0}, u32[], u32[]) collective-permute-start(f32[16]{0} %q)
  %ar = f32[10]{0} all-reduce(f32[10]{0} %r), to_apply=%add
  """
  assert sharding.collective_bytes(hlo) == {
      "all-gather": 32 * 8 * 4, "collective-permute": 16 * 4, "all-reduce": 40}
