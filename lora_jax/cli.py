"""The `lora-jax` command (also `python -m lora_jax`).

    lora-jax train [--config FILE] [section.key=value ...]
    lora-jax info [--config FILE] [section.key=value ...]
    lora-jax generate [--base MODEL] [--adapter DIR] [--prompt TEXT] [--chat] ...
    lora-jax generate [--base MODEL] --adapter NAME=DIR ... --prompts FILE [--output FILE]
    lora-jax merge --adapter DIR --output DIR [--base MODEL]
    lora-jax pretrain [--config FILE] [...]      (how the shipped tiny model was made)
    lora-jax export-peft --adapter DIR --output DIR [--base-model NAME]
    lora-jax import-peft --adapter DIR --output DIR

Bad input gives a one-line error and exit status 2, never a traceback.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

# ImportError: an optional dependency the input needs (pyarrow, sentencepiece), named.
USAGE_ERRORS = (ValueError, FileNotFoundError, FileExistsError, KeyError, ImportError)


def _parser() -> argparse.ArgumentParser:
  parser = argparse.ArgumentParser(prog="lora-jax", description="LoRA fine-tuning for JAX/Flax.")
  sub = parser.add_subparsers(dest="command", required=True)

  def with_config(name: str, help_: str) -> argparse.ArgumentParser:
    p = sub.add_parser(name, help=help_)
    p.add_argument("--config", help="YAML run config (default: the built-in demo)")
    p.add_argument("overrides", nargs="*", metavar="section.key=value",
                   help="replace single config values, e.g. train.steps=100")
    return p

  train = with_config("train", "fine-tune with LoRA; resumes from output_dir")
  train.add_argument("--no-progress", action="store_true", help="no progress bar")
  with_config("info", "model size, trainable params and the layers the config adapts")
  pretrain = with_config("pretrain", "train every param from the config's base (no LoRA)")
  pretrain.add_argument("--no-progress", action="store_true")

  base_help = "hf:DIR (a Hugging Face checkpoint), a model directory, or builtin:NAME"
  gen = sub.add_parser("generate", help="continue a prompt, or answer it (--chat), with a model "
                       "and an adapter")
  gen.add_argument("--base", default="builtin:tiny-kjv", help=base_help)
  gen.add_argument("--adapter", action="append", metavar="DIR | NAME=DIR",
                   help="a lora_jax adapter directory (a run's output_dir/adapter) or a PEFT "
                   "adapter directory; with --prompts, NAME=DIR, once per adapter the file names")
  gen.add_argument("--prompt", help="text to continue, or with --chat the message")
  gen.add_argument("--prompts", metavar="FILE",
                   help='JSONL, one {"prompt": ..., "adapter": NAME or null, "system": ...} a '
                   "line: all run as one batch, each with its adapter; prints a JSON line each")
  gen.add_argument("--output", metavar="FILE", help="with --prompts: write the JSON lines to "
                   "this new file (an existing one is never overwritten)")
  gen.add_argument("--chat", action="store_true",
                   help="send the prompt as a user message through the chat template and print "
                   "the reply")
  gen.add_argument("--system", help="a system message (with --chat)")
  gen.add_argument("--max-new-tokens", type=int, default=200)
  gen.add_argument("--temperature", type=float, default=0.0, help="0: greedy")
  gen.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling's mass")
  gen.add_argument("--seed", type=int, default=0,
                   help="the sampling seed (a --prompts line's \"seed\" is its own)")
  quantize_help = ("load the base's linear kernels quantized: nf4, int4 or int8 (a QLoRA "
                   "adapter's own base, as trained with model.quantize)")
  block_help = "the quantization block the adapter was trained with (model.quantize_block)"
  gen.add_argument("--quantize", default="none", help=quantize_help)
  gen.add_argument("--quantize-block", type=int, help=block_help)

  merge = sub.add_parser("merge", help="fold an adapter into its base: a new model of the "
                         "base's kind (a Hugging Face checkpoint for hf: bases)")
  merge.add_argument("--base", default="builtin:tiny-kjv", help=base_help)
  merge.add_argument("--adapter", required=True)
  merge.add_argument("--output", required=True)
  merge.add_argument("--dtype", help="e.g. bfloat16 (default: keep each param's dtype)")
  merge.add_argument("--quantize", default="none", help=quantize_help + "; the adapter merges "
                     "into the dequantized kernels")
  merge.add_argument("--quantize-block", type=int, help=block_help)

  export = sub.add_parser("export-peft", help="write an adapter in PEFT's format (for "
                          "transformers, vLLM)")
  export.add_argument("--adapter", required=True, help="a lora_jax adapter directory")
  export.add_argument("--output", required=True, help="a new directory for the PEFT adapter")
  export.add_argument("--base-model", help="base_model_name_or_path to record, e.g. a hub name")
  imp = sub.add_parser("import-peft", help="read a PEFT LoRA adapter (of Llama, Mistral, "
                       "Qwen or Gemma) into a lora_jax adapter directory")
  imp.add_argument("--adapter", required=True, help="a PEFT adapter directory")
  imp.add_argument("--output", required=True, help="a new lora_jax adapter directory")
  return parser


def main(argv: Sequence[str] | None = None) -> int:
  args = _parser().parse_args(argv)
  try:
    return _run(args)
  except USAGE_ERRORS as e:
    message = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    print(f"lora-jax {args.command}: error: {message}", file=sys.stderr)
    return 2


def _base(args: argparse.Namespace):
  """The base (a `ModelSection`) that `generate` and `merge` name."""
  from lora_jax.recipe import ModelSection
  return ModelSection(base=args.base, quantize=args.quantize,
                      quantize_block=args.quantize_block)


def _single_adapter(values: Sequence[str]) -> str | None:
  """The adapter directory of a single prompt (`--adapter DIR`), if any."""
  if len(values) > 1:
    raise ValueError("several --adapter NAME=DIR go with --prompts FILE, whose lines name their "
                     "adapters; one --prompt takes one --adapter DIR")
  if not values:
    return None
  name, sep, _ = values[0].partition("=")
  if sep and name and not Path(values[0]).exists():
    raise ValueError(f"--adapter {values[0]}: no such directory; NAME=DIR names adapters for "
                     "--prompts FILE, and one --prompt takes the directory alone")
  return values[0]


def _named_adapters(values: Sequence[str]) -> dict[str, str]:
  """`--adapter NAME=DIR` values as name -> directory, checked."""
  from lora_jax.config import check_adapter_name
  named: dict[str, str] = {}
  for value in values:
    name, sep, path = value.partition("=")
    if not sep or not name or not path:
      raise ValueError(f"--adapter {value}: with --prompts each adapter is NAME=DIR, NAME being "
                       "what the file's \"adapter\" fields say")
    check_adapter_name(name, f"--adapter {value}: ")
    if name in named:
      raise ValueError(f"--adapter {value}: the name {name!r} is given twice (also "
                       f"{name}={named[name]})")
    named[name] = path
  return named


def _generate_batch(args: argparse.Namespace) -> int:
  """`generate --prompts FILE`: every prompt with its adapter, one batch, JSON lines out."""
  import json

  from lora_jax import formats, serve
  if args.prompt is not None:
    raise ValueError("--prompt and --prompts both given: give one prompt, or a file of them")
  adapters = _named_adapters(args.adapter or [])
  output = None
  if args.output is not None:
    output = Path(args.output)
    if output.exists():
      raise FileExistsError(f"--output {output} exists: refusing to overwrite it; choose a new "
                            "file")
    if not output.parent.is_dir():
      raise FileNotFoundError(f"--output {output}: the directory {output.parent} does not exist")
  prompts = formats.read_prompts(args.prompts)
  replies = serve.generate_batch(
      _base(args), prompts, adapters=adapters, chat=args.chat, system=args.system,
      max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_p=args.top_p,
      seed=args.seed)
  lines = "".join(json.dumps({"adapter": p.adapter, "prompt": p.prompt, "completion": reply},
                             ensure_ascii=False) + "\n" for p, reply in zip(prompts, replies))
  if output is None:
    print(lines, end="")
  else:
    with open(output, "x", encoding="utf-8") as f:  # "x": never replaces a file
      f.write(lines)
    print(f"{len(prompts)} completions written: {output}")
  return 0


def _size(n: int) -> str:
  return f"{n / 2**30:.2f} GiB" if n >= 2**30 else f"{n / 2**20:.2f} MiB"


def _run(args: argparse.Namespace) -> int:
  # Imported here so that `--help` and argument errors answer at once.
  from lora_jax import recipe, run, serve

  if args.command in ("train", "pretrain", "info"):
    cfg = recipe.load(args.config, args.overrides)
    if args.command == "info":
      facts = run.describe(cfg)
      print(f"model: {cfg.model.base} ({facts['kind']}, {facts['family']}), "
            f"{facts['layers']} layers, {facts['params']:,} params")
      q = facts["quantized"]
      print(f"frozen base: {_size(facts['base_bytes'])} stored"
            + (f" ({q['format']}: {8 * q['quantized_bytes'] / q['quantized_weights']:.3f} bits "
               f"per weight in {q['quantized_weights']:,} quantized weights)"
               if q["quantized_weights"] else "")
            + f", {_size(facts['base_bf16_bytes'])} in bfloat16")
      print(f"trainable: {facts['trainable']:,} "
            f"({100 * facts['trainable'] / facts['params']:.3f}%)")
      for name, adapter in facts.get("adapters", {}).items():
        print(f"adapter {name}: {adapter['adapter_params']:,} params in "
              f"{len(adapter['targets'])} layers")
      print(f"adapted layers ({len(facts['targets'])}):")
      for path in facts["targets"]:
        print(f"  {path}")
      return 0
    result = run.train_run(cfg, progress=not args.no_progress, full=args.command == "pretrain")
    before, after = result.get("eval_before"), result.get("eval_after")
    if isinstance(before, dict):  # several adapters: each one's loss on its own rows
      for name in before:
        print(f"eval loss ({name}): {before[name]:.4f} -> {after[name]:.4f}")
    elif before is not None:
      print(f"eval loss: {before:.4f} -> {after:.4f}")
    return 0
  if args.command == "generate":
    if args.prompts is not None:
      return _generate_batch(args)
    if args.output is not None:
      raise ValueError("--output writes the results of --prompts FILE; one --prompt prints its "
                       "reply")
    adapter = _single_adapter(args.adapter or [])
    prompt = args.prompt or ""
    reply = serve.generate_text(
        _base(args), prompt, adapter=adapter, chat=args.chat,
        system=args.system, max_new_tokens=args.max_new_tokens, temperature=args.temperature,
        top_p=args.top_p, seed=args.seed)
    print(reply if args.chat else prompt + reply)
    return 0
  if args.command in ("export-peft", "import-peft"):
    from lora_jax import checkpoint, hf
    if args.command == "export-peft":
      adapters, config = checkpoint.load_adapter(args.adapter)
      path = hf.export_peft(args.output, adapters, config, base_model_name_or_path=args.base_model)
    else:
      path = checkpoint.save_adapter(args.output, *hf.import_peft(args.adapter))
    print(f"adapter written: {path}")
    return 0
  path = serve.merge_adapter(_base(args), args.adapter, args.output,
                           dtype=args.dtype)
  print(f"merged model: {path}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
