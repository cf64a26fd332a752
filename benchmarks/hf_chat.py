"""How a run on your own checkpoint looks: `lora-jax train` on a Hugging Face checkpoint with chat data.

Builds a tiny random Llama saved by transformers (2 layers, hidden 64) with a
byte-level BPE tokenizer trained on the shipped Devil's Dictionary and a
Llama-3-style chat template (`tests/tiny_hf.py`), writes chat JSONL (the
user names a word, the assistant defines it), and runs the same command a
TPU user runs on a downloaded checkpoint:

    lora-jax train model.base=hf:CHECKPOINT data.train=chat.jsonl ...

It prints the steps, the wall time of the command (start-up and compiles
included), the eval loss before and after (assistant tokens only) and a
greedy chat reply from `lora-jax generate --chat` with the adapter.

Usage:
  python benchmarks/hf_chat.py [--steps 200] [--workdir DIR]
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import re
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))


def main(argv=None) -> dict:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--steps", type=int, default=200)
  p.add_argument("--workdir", help="where to build (default: a temporary directory)")
  args = p.parse_args(argv)
  from tiny_hf import chat_rows, make_checkpoint

  from lora_jax import cli

  work = Path(args.workdir or tempfile.mkdtemp())
  ckpt = make_checkpoint(work / "tiny-llama")
  rows = chat_rows()
  (work / "chat.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
  out = work / "run"
  argv = ["train", "--no-progress", f"model.base=hf:{ckpt}", f"data.train={work / 'chat.jsonl'}",
          "data.seq_len=128", "train.batch_size=16", f"train.steps={args.steps}",
          "train.learning_rate=0.005", "train.warmup_steps=10", "train.eval_every=0",
          "train.eval_batches=8", f"train.save_every={args.steps}", "lora.rank=16",
          "lora.alpha=32", f"output_dir={out}"]
  print("lora-jax " + " ".join(argv))
  start = time.perf_counter()
  buffer = io.StringIO()
  with contextlib.redirect_stdout(buffer):
    code = cli.main(argv)
  wall = time.perf_counter() - start
  log = buffer.getvalue()
  print(log, end="")
  if code:
    raise SystemExit(code)
  before, after = map(float, re.search(r"eval loss: ([\d.]+) -> ([\d.]+)", log).groups())
  question = "Define LAWYER."
  replies = {}
  for name, adapter in (("base", []), ("adapter", ["--adapter", str(out / "peft")])):
    buffer = io.StringIO()
    with contextlib.redirect_stdout(buffer):
      cli.main(["generate", "--base", f"hf:{ckpt}", *adapter, "--chat", "--prompt", question,
                "--max-new-tokens", "40"])
    replies[name] = buffer.getvalue().strip()
  result = {"rows": len(rows), "steps": args.steps, "wall_s": round(wall, 1),
            "eval_before": before, "eval_after": after, "question": question, **replies}
  print(json.dumps(result, indent=2))
  return result


if __name__ == "__main__":
  main()
