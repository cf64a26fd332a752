"""Test session fixtures: one XLA compilation cache, one tiny Hugging Face checkpoint.

Each of pytest-xdist's workers (pyproject's addopts) is a session of its own
here: its own cache and checkpoint.

Many tests build a fresh `jax.jit` of the same program (a train step, a
forward, a decode loop) from a new closure; without a shared cache each one
compiles it again. The session's cache lives in a temporary directory made
here and removed at the end, so every session starts cold, as CI does, and
no test sees another session's executables. Executables are the same either
way: only compile times change (as in `benchmarks/compare.py`). Subprocesses
the tests start do not inherit it.
"""

import shutil
import tempfile

import jax
import pytest

import tiny_hf

_CACHE_DIR = tempfile.mkdtemp(prefix="lora_jax-tests-xla-")
# Before any test module compiles anything (some do at import).
jax.config.update("jax_compilation_cache_dir", _CACHE_DIR)
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.2)
jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)


def pytest_unconfigure(config):
  shutil.rmtree(_CACHE_DIR, ignore_errors=True)


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory):
  """`tiny_hf.make_checkpoint`'s default checkpoint, built once for every module that reads it.

  Tests must not write into it: copy it first (as the tests that bias or
  re-save its weights do).
  """
  return tiny_hf.make_checkpoint(tmp_path_factory.mktemp("hf") / "tiny-llama")
