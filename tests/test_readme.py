"""The README's Python snippets run as written."""

import re
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"
SNIPPETS = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)


def test_readme_has_snippets():
  assert len(SNIPPETS) >= 2


@pytest.fixture(scope="module")
def namespace():
  """One namespace for the whole README: later snippets build on earlier ones."""
  return {}


@pytest.mark.parametrize("index", range(len(SNIPPETS)))
def test_snippet_runs(index, namespace, capsys):
  exec(compile(SNIPPETS[index], f"README.md[{index}]", "exec"), namespace)


def test_ci_runs_the_readme_test_command():
  """`.ci/run` runs exactly the README's install-and-test command."""
  ci = (README.parent / ".ci" / "run").read_text().strip().splitlines()[-1]
  commands = re.findall(r"```sh\n(.*?)\n```", README.read_text(), flags=re.S)
  assert ci in commands and ci.endswith("python -m pytest")
