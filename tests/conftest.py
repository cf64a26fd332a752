"""Test session fixtures: one tiny Hugging Face checkpoint for every module that reads it."""

import pytest

import tiny_hf


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory):
  """`tiny_hf.make_checkpoint`'s default checkpoint, built once for every module that reads it.

  Tests must not write into it: copy it first (as the tests that bias or
  re-save its weights do).
  """
  return tiny_hf.make_checkpoint(tmp_path_factory.mktemp("hf") / "tiny-llama")
