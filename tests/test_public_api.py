"""The public surface: every exported name imports and is documented."""

import importlib
import types

import pytest

import lora_jax


@pytest.mark.parametrize("name", lora_jax.__all__)
def test_each_public_name_imports_and_has_a_docstring(name):
  obj = getattr(lora_jax, name)
  assert obj.__doc__ and obj.__doc__.strip(), f"{name} has no docstring"
  assert importlib.import_module(obj.__module__) is not None


def test_all_lists_exactly_the_public_names():
  public = {n for n, v in vars(lora_jax).items()
            if not n.startswith("_") and not isinstance(v, types.ModuleType)}
  assert set(lora_jax.__all__) == public
  assert len(lora_jax.__all__) == len(set(lora_jax.__all__))
