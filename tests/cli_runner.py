"""The `lora-jax` command line, run in this process with its output captured."""

import contextlib
import io


def lora_jax(*argv) -> tuple[int, str, str]:
  """Runs `lora-jax ARGV...` in this process, as `lora_jax.cli.main` does for the console script.

  In-process runs share this process's compiled programs, so a test can call
  the command many times without paying for a new interpreter, a jax import
  and fresh compilations each time.

  Args:
    *argv: the command line after `lora-jax`, e.g. `"train", "--no-progress", "train.steps=2"`.

  Returns:
    `(exit code, stdout, stderr)`.
  """
  from lora_jax import cli

  out, err = io.StringIO(), io.StringIO()
  with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
    code = cli.main(list(argv))
  return code, out.getvalue(), err.getvalue()
