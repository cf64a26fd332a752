"""compare.py's results as a markdown report and a PNG chart (matplotlib, Agg)."""

from __future__ import annotations

LABELS = {"lora_jax": "lora_jax", "nnx": "flax.nnx.LoRA", "qwix": "qwix LoRA",
          "peft": "HF PEFT (torch)", "full": "full FT (JAX)", "lora_jax_nf4": "lora_jax NF4",
          "qwix_nf4": "qwix NF4"}
MiB = 1 << 20


def _mib(n: float) -> str:
  return f"{n / MiB:,.0f}"


def _machine_line(env: dict) -> str:
  return (f"{env['machine']}, {env['cpu_count']} cores; jax {env['jax']}, flax {env['flax']}, "
          f"optax {env['optax']}, qwix {env['qwix']}, torch {env['torch']} "
          f"({env['torch_threads']} threads), transformers {env['transformers']}, "
          f"peft {env['peft']}; {env['date']}")


def _model_line(size: str, r: dict) -> str:
  s, z = r["spec"], r["spec"]["size"]
  return (f"{size}: {r['params'] / 1e6:.1f}M params (hidden {z['hidden_size']}, "
          f"{z['num_layers']} layers, {z['num_heads']}/{z['num_kv_heads']} heads, mlp "
          f"{z['intermediate_size']}, vocab {z['vocab_size']}); batch {s['batch']} x seq "
          f"{s['seq']}, fp32, AdamW; LoRA rank {s['rank']}, alpha {s['alpha']:g}, "
          f"q/k/v/o/gate/up/down")


def size_table(size: str, r: dict) -> str:
  """Markdown for one model size: every table."""
  t, out = r["train"], []
  steps = len(next(iter({**t, **r.get("qlora", {})}.values()))["step_times_s"])
  out += [f"### {_model_line(size, r)}", "",
          f"Train step, median of {steps} warm steps, contenders interleaved; ratio = "
          "contender / lora_jax (above 1: lora_jax is faster). Peak RSS of each contender's own "
          "process: over its life (imports, set-up, compilation, steps) and while the timed "
          "steps ran; `imports`: its RSS after importing its libraries. Logits diff: max "
          "|logits - the linen model's| on the batch before training (the same model and "
          "weights).", "",
          "| contender | step ms | ratio to lora_jax | trained params | peak RSS MiB "
          "| peak RSS, steps MiB | imports MiB | logits diff | loss before |",
          "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
  for n, c in t.items():
    out.append(f"| {LABELS[n]} | {c['median_s'] * 1e3:,.1f} | {c['ratio_to_lora_jax']:.2f} | "
               f"{c['trained_params']:,} | {_mib(c['peak_rss'])} | "
               f"{_mib(c['peak_rss_steps'])} | {_mib(c['rss_after_imports'])} | "
               f"{c['logits_max_abs_diff']:.1e} | {c['first_loss']:.5f} |")
  if "qlora" in r:
    out += ["", _qlora_table(r)]
  if "lora_jax" in t and "full" in t:
    lj, full = t["lora_jax"], t["full"]
    out += ["", "Compiled train step (XLA `cost_analysis` / `memory_analysis`; total = "
            "argument + temp + output - alias; a scanned program's FLOPs count its loop body "
            "once):", "",
            "| | FLOPs | argument MiB | temp MiB | total MiB | scan + remat='full': FLOPs "
            "| total MiB |", "|---|---:|---:|---:|---:|---:|---:|"]
    for name, c in (("lora_jax LoRA", lj), ("full FT", full)):
      rm = c.get("remat_full")
      remat = f"{rm['flops']:.3e} | {_mib(rm['total_bytes'])}" if rm else "- | -"
      out.append(f"| {name} | {c['flops']:.3e} | {_mib(c['argument_bytes'])} | "
                 f"{_mib(c['temp_bytes'])} | {_mib(c['total_bytes'])} | {remat} |")
    s = r["summary"]
    remat = (f"{s['flop_ratio_remat']:.3f} | {s['memory_ratio_remat']:.3f}"
             if "memory_ratio_remat" in s else "- | -")
    out.append(f"| LoRA / full | {s['flop_ratio']:.3f} | | | {s['memory_ratio']:.3f} | "
               f"{remat} |")
  if "forward" in r:
    f = r["forward"]
    base_t, base_f = f["median_s"]["base"], f["flops"]["base"]
    out += ["", f"Forward (jitted, median of {f['reps']} interleaved calls; merged = the plain "
            "model on `lora_jax.merge`d rank-16 params, the same compiled program as base: "
            f"HLO identical {f['hlo_equal']['merged_vs_base']}; max |merged - unmerged| "
            f"{f['merged_vs_unmerged_max_abs_diff']:.1e}):", "",
            "| forward | ms | / base | FLOPs | / base |", "|---|---:|---:|---:|---:|"]
    for k in ("base", "merged", "unmerged_r8", "unmerged_r16", "unmerged_r64"):
      out.append(f"| {k} | {f['median_s'][k] * 1e3:,.1f} | {f['median_s'][k] / base_t:.3f} | "
                 f"{f['flops'][k]:.4e} | {f['flops'][k] / base_f:.4f} |")
  if "merge" in r:
    out += ["", "Merge, rank 16 (`jit`: `jax.jit(merge, static_argnums=1, donate_argnums=0)`, "
            "compile excluded; `eager`: `lora_jax.merge(params, config)`, first call includes "
            "compiling its ops; RSS: a fresh process holding the params, peak during the "
            "first merge):", "",
            "| merge | first s | median s | params MiB | RSS before MiB | peak RSS MiB "
            "| peak - before MiB | XLA temp MiB |", "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for m, g in r["merge"].items():
      temp = _mib(g["xla_temp_bytes"]) if "xla_temp_bytes" in g else "-"
      out.append(f"| {m} | {g['times_s'][0]:.3f} | {g['median_s']:.3f} | "
                 f"{_mib(g['param_bytes'])} | {_mib(g['rss_before'])} | "
                 f"{_mib(g['peak_rss_first'])} | "
                 f"{_mib(g['peak_rss_first'] - g['rss_before'])} | {temp} |")
  if "collectives" in r:
    c = r["collectives"]
    steps = [n for n in ("lora", "frozen", "full") if n in c]
    kinds = sorted({k for n in steps for k in c[n]["collective_bytes"]})
    out += ["", f"Collective bytes per device per step, {c['devices']} simulated CPU devices, "
            f"mesh {c['mesh']}, batch {c['batch']} x seq {c['seq']} "
            "(`lora_jax.sharding.collective_bytes`); frozen = the same model with only "
            "`layers_0/input_layernorm` trained:", "",
            "| step | " + " | ".join(kinds) + " | total | / frozen |",
            "|---|" + "---:|" * (len(kinds) + 2)]
    frozen = sum(c["frozen"]["collective_bytes"].values())
    for n in steps:
      b = c[n]["collective_bytes"]
      out.append(f"| {n} | " + " | ".join(f"{b.get(k, 0):,}" for k in kinds) +
                 f" | {sum(b.values()):,} | {sum(b.values()) / frozen:.4f} |")
  out += ["", "Targets: " + "; ".join(f"{k}: {'met' if v else 'NOT met'}"
                                      for k, v in r["summary"]["targets"].items()), ""]
  return "\n".join(out)


def _qlora_table(r: dict) -> str:
  """Markdown for the NF4 (QLoRA) contenders, timed in the same rounds as the others."""
  q, t = r["qlora"], r["train"]
  lines = ["QLoRA: the same LoRA on the same weights quantized to NF4 (blocks of 64; lora_jax "
           "double-quantizes the absmax values as QLoRA and bitsandbytes do, qwix keeps them in "
           "float32), dequantized to float32 in the step; timed in the same interleaved rounds. "
           "Bits: stored bits per quantized weight (codes and statistics). Logits diff: against "
           "the float model's, i.e. the quantization error.", "",
           "| contender | step ms | ratio to lora_jax NF4 | ratio to lora_jax (float) | FLOPs "
           "| FLOPs / lora_jax (float) | argument MiB | bits/weight | peak RSS, steps MiB "
           "| logits diff | loss before |", "|---|" + "---:|" * 10]
  ref_flops = t.get("lora_jax", {}).get("flops")
  for n, c in q.items():
    float_ratio = f"{c['ratio_to_lora_jax']:.2f}" if "lora_jax" in t else "-"
    flops = f"{c['flops'] / ref_flops:.3f}" if ref_flops and "flops" in c else "-"
    lines.append(f"| {LABELS[n]} | {c['median_s'] * 1e3:,.1f} | "
                 f"{c['ratio_to_lora_jax_nf4']:.2f} | {float_ratio} | {c.get('flops', 0):.3e} | "
                 f"{flops} | {_mib(c.get('argument_bytes', 0))} | "
                 f"{c.get('bits_per_weight', 0):.3f} | {_mib(c['peak_rss_steps'])} | "
                 f"{c['logits_max_abs_diff']:.1e} | {c['first_loss']:.5f} |")
  diff, n = q.get("qwix_nf4", {}).get("vs_lora_jax_nf4"), q.get("qwix_nf4", {}).get(
      "quantized_weights")
  if diff:
    one, two = diff["single"], diff["double"]
    lines += ["", f"qwix's dequantized NF4 kernels against lora_jax's NF4 of the same {n:,} "
              f"weights: without double quantization {one['weights_differing']:,} differ (max "
              f"|difference| {one['max_abs_diff']:.1e}); against lora_jax's default, "
              f"double-quantized NF4, {two['weights_differing']:,} differ (max "
              f"{two['max_abs_diff']:.1e}: the absmax values' 8-bit codes)."]
  return "\n".join(lines)


def markdown(results: dict, env: dict) -> str:
  head = ["# lora_jax vs the alternatives", "",
          f"Machine: {_machine_line(env)}.", "",
          "Generated by `python benchmarks/compare.py`; see benchmarks/README.md for how each "
          "contender is built.", "", ""]
  return "\n".join(head) + "\n\n".join(size_table(s, r) for s, r in results.items())


def chart(results: dict, env: dict, path: str) -> None:
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  sizes = list(results)
  fig, axes = plt.subplots(1, 3, figsize=(16, 5.2))
  width = 0.8 / len(sizes)

  ax = axes[0]  # train step time, ratio to lora_jax
  names = list(results[sizes[0]]["train"])
  for i, s in enumerate(sizes):
    t = results[s]["train"]
    xs = [j + i * width for j in range(len(names))]
    bars = ax.bar(xs, [t[n]["ratio_to_lora_jax"] for n in names], width, label=s)
    for b, n in zip(bars, names):
      _label(ax, b, f"{t[n]['median_s'] * 1e3:,.0f} ms")
  ax.axhline(1, color="k", lw=0.8)
  ax.set_xticks([j + width * (len(sizes) - 1) / 2 for j in range(len(names))],
                [LABELS[n] for n in names], rotation=20, ha="right", fontsize=8)
  ax.set_ylabel("train step time / lora_jax's (lower is faster)")
  ax.set_title("Train step (median, interleaved)")
  ax.legend(fontsize=8)

  ax = axes[1]  # compiled memory and FLOPs of LoRA vs full, and peak RSS
  keys = [("flops", "FLOPs"), ("total_bytes", "XLA memory"),
          ("remat_total_bytes", "XLA memory,\nscan + remat"), ("peak_rss", "peak RSS")]

  def figure(c: dict, key: str) -> float:
    if key.startswith("remat_"):
      return c.get("remat_full", {}).get(key[len("remat_"):], float("nan"))
    return c[key]

  for i, s in enumerate(sizes):
    t = results[s]["train"]
    if "lora_jax" not in t or "full" not in t:
      continue
    vals = [figure(t["lora_jax"], k) / figure(t["full"], k) for k, _ in keys]
    bars = ax.bar([j + i * width for j in range(len(keys))], vals, width, label=s)
    for b, v in zip(bars, vals):
      _label(ax, b, f"{v:.2f}")
  ax.axhline(0.70, color="tab:red", lw=0.8, ls="--", label="FLOP target 0.70")
  ax.axhline(0.40, color="tab:purple", lw=0.8, ls=":", label="memory target 0.40")
  ax.set_xticks([j + width * (len(sizes) - 1) / 2 for j in range(len(keys))],
                [k for _, k in keys], fontsize=8)
  ax.set_ylabel("lora_jax LoRA step / full fine-tuning step")
  ax.set_title("LoRA vs full fine-tuning")
  ax.legend(fontsize=7)

  ax = axes[2]  # forward latency relative to base
  fkeys = ["base", "merged", "unmerged_r8", "unmerged_r16", "unmerged_r64"]
  for i, s in enumerate(sizes):
    f = results[s].get("forward")
    if not f:
      continue
    vals = [f["median_s"][k] / f["median_s"]["base"] for k in fkeys]
    bars = ax.bar([j + i * width for j in range(len(fkeys))], vals, width, label=s)
    for b, k in zip(bars, fkeys):
      _label(ax, b, f"{f['median_s'][k] * 1e3:,.0f} ms")
  ax.axhline(1, color="k", lw=0.8)
  ax.set_xticks([j + width * (len(sizes) - 1) / 2 for j in range(len(fkeys))],
                ["base", "merged", "LoRA r8", "LoRA r16", "LoRA r64"], fontsize=8)
  ax.set_ylabel("forward time / base model's")
  ax.set_title("Forward latency")
  ax.legend(fontsize=8)

  for ax in axes:
    ax.set_ylim(0, ax.get_ylim()[1] * 1.15)  # room for the labels
  models = "; ".join(_model_line(s, r) for s, r in results.items())
  fig.suptitle("lora_jax vs flax.nnx.LoRA, qwix, HF PEFT and full fine-tuning", fontsize=12)
  fig.text(0.5, 0.005, _wrap(f"{models}\n{_machine_line(env)}"), ha="center", va="bottom",
           fontsize=7)
  fig.tight_layout(rect=(0, 0.1, 1, 0.95))
  fig.savefig(path, dpi=110)
  plt.close(fig)


def _label(ax, bar, text: str) -> None:
  ax.annotate(text, (bar.get_x() + bar.get_width() / 2, bar.get_height()), ha="center",
              va="bottom", fontsize=7, rotation=90, xytext=(0, 2), textcoords="offset points")


def _wrap(text: str, width: int = 190) -> str:
  import textwrap
  return "\n".join(textwrap.fill(line, width) for line in text.splitlines())


if __name__ == "__main__":  # re-render from the JSON files: python benchmarks/report.py [DIR]
  import glob
  import json
  import os
  import sys
  out = sys.argv[1] if len(sys.argv) > 1 else os.path.join(os.path.dirname(__file__), "results")
  order = {"tiny": 0, "small": 1, "large": 2}
  paths = sorted(glob.glob(os.path.join(out, "compare_*.json")),
                 key=lambda p: order.get(p.rsplit("_", 1)[1][:-5], 9))
  results = {}
  for path in paths:
    with open(path) as f:
      results[path.rsplit("_", 1)[1][:-5]] = json.load(f)
  env = next(iter(results.values()))
  with open(os.path.join(out, "compare.md"), "w") as f:
    f.write(markdown(results, env))
  chart(results, env, os.path.join(out, "compare.png"))
