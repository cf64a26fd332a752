"""LoRAConfig: validation, path rules, serialisation."""

import dataclasses

import jax
import numpy as np
import pytest

from lora_jax import LoRAConfig


def test_defaults_follow_peft():
  c = LoRAConfig()
  assert (c.rank, c.alpha, c.dropout_rate, c.a_init, c.lora_dtype) == (
      8, 8.0, 0.0, "kaiming_uniform", "float32")
  assert c.targets == "all-linear" and c.exclude == () and c.trainable == ()
  assert c.scale("any/layer") == 1.0


@pytest.mark.parametrize("kwargs, message", [
    ({"rank": 0}, "rank=0"),
    ({"rank": -3}, "rank=-3"),
    ({"rank": True}, "rank=True"),
    ({"alpha": 0}, "alpha=0"),
    ({"alpha": float("nan")}, "alpha=nan"),
    ({"dropout_rate": 1.0}, "dropout_rate=1.0"),
    ({"dropout_rate": -0.5}, "dropout_rate=-0.5"),
    ({"a_init": "orthogonal"}, "a_init='orthogonal'"),
    ({"lora_dtype": "int8"}, "lora_dtype='int8'"),
    ({"use_dora": "yes"}, "use_dora='yes'"),
    ({"targets": "(q_proj"}, "targets='\\(q_proj'.*regular expression"),
    ({"targets": []}, "targets=\\(\\)"),
    ({"targets": ["q_proj", ""]}, "targets=''"),
    ({"exclude": 3}, "exclude=3"),
    ({"rank_pattern": {"q_proj": 0}}, "rank_pattern\\['q_proj'\\]=0"),
    ({"rank_pattern": {"[": 4}}, "rank_pattern='\\['"),
    ({"alpha_pattern": {"v_proj": -2.0}}, "alpha_pattern\\['v_proj'\\]=-2.0"),
    ({"rank_pattern": 5}, "rank_pattern=5"),
    ({"trainable": ["head("]}, "trainable='head\\('"),
])
def test_invalid_values_raise_naming_field_and_value(kwargs, message):
  with pytest.raises(ValueError, match=message):
    LoRAConfig(**kwargs)


def test_unknown_key_is_named_with_a_suggestion():
  with pytest.raises(ValueError, match="unknown LoRA config key 'rnak'; did you mean 'rank'"):
    LoRAConfig.from_dict({"rnak": 4})
  with pytest.raises(ValueError, match="'zzz'.*known keys"):
    LoRAConfig.from_dict({"zzz": 4})
  with pytest.raises(ValueError, match="must be a mapping"):
    LoRAConfig.from_yaml("- 1\n- 2\n")


FULL = LoRAConfig(
    rank=16, alpha=32, targets=["q_proj", "v_proj"], exclude=".*layers_0/.*", dropout_rate=0.1,
    use_rslora=True, use_dora=True, a_init="gaussian", rank_pattern={"v_proj": 4, "o": 2},
    alpha_pattern={"layers_1/.*": 8.0}, trainable=["classifier"], lora_dtype="bfloat16")


@pytest.mark.parametrize("config", [LoRAConfig(), FULL], ids=["default", "full"])
def test_round_trips(config):
  assert LoRAConfig.from_dict(config.to_dict()) == config
  assert LoRAConfig.from_json(config.to_json()) == config
  assert LoRAConfig.from_yaml(config.to_yaml()) == config


def test_dict_form_is_plain_and_patterns_keep_order():
  d = FULL.to_dict()
  assert d["rank_pattern"] == {"v_proj": 4, "o": 2} and list(d["rank_pattern"]) == ["v_proj", "o"]
  assert d["targets"] == ["q_proj", "v_proj"] and d["lora_dtype"] == "bfloat16"
  assert FULL.rank_pattern == (("v_proj", 4), ("o", 2))


def test_config_is_frozen_and_hashable_for_jit():
  with pytest.raises(dataclasses.FrozenInstanceError):
    FULL.rank = 3
  assert hash(FULL) == hash(LoRAConfig.from_json(FULL.to_json()))
  f = jax.jit(lambda x, c: x * c.scale("q_proj"), static_argnums=1)
  assert float(f(1.0, FULL)) == pytest.approx(8.0)  # alpha 32 / sqrt(16)


def test_rank_and_alpha_patterns_first_match_wins_by_suffix():
  c = LoRAConfig(rank=8, alpha=16, rank_pattern={"v_proj": 4, ".*_proj": 2},
                 alpha_pattern={"layers_1/.*": 2.0})
  assert c.rank_for("layers_0/attn/v_proj") == 4
  assert c.rank_for("layers_0/attn/q_proj") == 2
  assert c.rank_for("layers_0/attn/out") == 8
  assert c.rank_for("layers_0/attn/my_v_proj") == 2  # suffix of components, not of text
  assert c.alpha_for("layers_1/mlp/up") == 2.0 and c.alpha_for("layers_0/mlp/up") == 16
  assert c.scale("layers_0/attn/v_proj") == 4.0
  assert c.adapter_for("layers_1/attn/q_proj").scale == 1.0
  assert LoRAConfig(rank=16, alpha=8, use_rslora=True).scale("x") == 2.0


def test_targets_forms():
  regex = LoRAConfig(targets=".*/(q_proj|v_proj)")
  assert regex.selects("layers_0/attn/q_proj") and not regex.selects("q_proj")
  assert not regex.selects("layers_0/attn/k_proj")
  names = LoRAConfig(targets=["q_proj", "mlp/up"])
  assert names.selects("layers_0/attn/q_proj") and names.selects("q_proj")
  assert names.selects("layers_3/mlp/up") and not names.selects("layers_3/up")
  assert not names.selects("layers_0/attn/xq_proj")
  assert LoRAConfig(targets="q_proj").selects("q_proj")  # a bare string is a regex
  linear = LoRAConfig()
  assert linear.selects("layers_0/mlp/down") and not linear.selects("lm_head")
  assert not linear.selects("model/classifier") and not linear.selects("score")


def test_exclude_is_checked_first():
  c = LoRAConfig(targets=["q_proj"], exclude=["layers_0/attn/q_proj"])
  assert not c.selects("layers_0/attn/q_proj") and c.selects("layers_1/attn/q_proj")
  c = LoRAConfig(exclude="layers_0/.*")
  assert not c.selects("layers_0/mlp") and c.selects("layers_1/mlp")


def test_trainable_covers_whole_modules_like_modules_to_save():
  c = LoRAConfig(trainable=["classifier"])
  assert c.is_trainable("classifier/dense/kernel") and c.is_trainable("classifier/out_proj/bias")
  assert c.trainable_rule("roberta/classifier/dense/kernel") == "classifier"
  assert not c.is_trainable("classifier_head/kernel")


def test_numpy_flags_serialise():
  c = LoRAConfig(use_dora=np.True_)
  assert c.use_dora is True and LoRAConfig.from_json(c.to_json()) == c


def test_trainable_matches_module_or_param_paths():
  c = LoRAConfig(trainable=["classifier", ".*norm/scale"])
  assert c.is_trainable("classifier/kernel") and c.is_trainable("model/classifier/bias")
  assert c.is_trainable("layers_0/input_norm/scale")
  assert not c.is_trainable("layers_0/attn/q_proj/kernel")
  assert not LoRAConfig().is_trainable("classifier/kernel")


def test_a_repeated_pattern_key_is_refused():
  for field in ("rank_pattern", "alpha_pattern"):
    with pytest.raises(ValueError, match=f"LoRA {field}=.*key 'v_proj' appears more than once"):
      LoRAConfig(**{field: [("v_proj", 4), ("q_proj", 2), ("v_proj", 8)]})
  pairs = LoRAConfig(rank_pattern=[("v_proj", 4), (".*", 2)])  # order is kept through JSON
  assert LoRAConfig.from_json(pairs.to_json()) == pairs


def test_one_rule_form_per_field():
  c = LoRAConfig(targets=["q_proj"], exclude="layers_0/.*", rank_pattern={"v.*": 2},
                 trainable=["head"])
  (target,), (exclude,) = c.rules("targets"), c.rules("exclude")
  assert target.matches("a/q_proj") and not target.matches("a/qxproj")  # a literal name
  assert not c.rules("targets")[0].matches("a/q_proj/x")
  assert exclude.matches("layers_0/a") and not exclude.matches("x/layers_0/a")  # whole path
  assert c.rules("rank_pattern")[0].matches("a/v_proj")  # a regex over trailing components
  assert LoRAConfig().rules("targets") == ()  # all-linear is no rule
  assert str(c.rules("trainable")[0]) == "trainable rule 'head'"
  assert [str(r) for r in c.unmatched_rules(["layers_0/q_proj"], ["layers_0/q_proj/kernel"])] == [
      "rank_pattern key 'v.*'", "trainable rule 'head'"]
