"""Many adapters on one base from the command line: `generate --prompts` runs every prompt with
its own adapter in one batch, as each would run alone; a run with `adapters` trains several
adapters at once, each as a run of its own on its rows would, and resumes."""

import contextlib
import io
import json
import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import lora_jax as lj
from lora_jax import bases, checkpoint, cli, hf, serve, stacked_run
from lora_jax.formats import Prompt, read_prompts
from lora_jax.models.llama import Llama
from lora_jax.recipe import ModelSection


def lora_jax(capsys, *argv):
  code = cli.main(list(argv))
  out, err = capsys.readouterr()
  return code, out, err


def write_jsonl(path, rows):
  path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
  return path


# --- generate --prompts ----------------------------------------------------------------------


@pytest.fixture(scope="module")
def adapters(tmp_path_factory):
  """Two random adapters of the shipped model, as if trained: `a` a lora_jax directory
  (rank 4, q/v), `b` a PEFT directory (rank 8, o/down)."""
  root = tmp_path_factory.mktemp("adapters")
  base_model = bases.resolve(ModelSection())
  llama = Llama(base_model.config)

  def made(config, seed):  # shapes traced, not initialised: no compile
    shapes = jax.eval_shape(lj.inject(llama, config).init, jax.random.key(0),
                            jnp.zeros((1, 4), jnp.int32))["params"]
    rng = np.random.default_rng(seed)
    return jax.tree.map(lambda s: (0.1 * rng.standard_normal(s.shape)).astype(s.dtype),
                        lj.split(nn.unbox(shapes), config)[0])

  config_a = lj.LoRAConfig(rank=4, alpha=8.0, targets=["q_proj", "v_proj"])
  config_b = lj.LoRAConfig(rank=8, alpha=16.0, targets=["o_proj", "down_proj"])
  checkpoint.save_adapter(root / "a", made(config_a, 1), config_a)
  hf.export_peft(root / "b", made(config_b, 2), config_b, model_config=base_model.config)
  # A rank-4 q_proj adapter of a model half as wide: it fits no layer of the shipped one.
  misfit = {"layers_0": {"self_attn": {"q_proj": {"lora_a": jnp.ones((64, 4)),
                                                  "lora_b": jnp.ones((4, 64))}}}}
  checkpoint.save_adapter(root / "misfit", misfit, lj.LoRAConfig(rank=4, targets=["q_proj"]))
  return root


ROWS = [{"prompt": "LAWYER, n. One skilled in", "adapter": "a"},
        {"prompt": "And the LORD"},  # the base; shorter, so left-padded in the batch
        {"prompt": "LAWYER, n. One skilled in", "adapter": "b"}]


def test_prompts_run_in_one_batch_each_as_it_runs_alone(adapters, tmp_path, capsys):
  prompts = write_jsonl(tmp_path / "prompts.jsonl", ROWS)
  named = ["--adapter", f"a={adapters / 'a'}", "--adapter", f"b={adapters / 'b'}"]
  code, out, err = lora_jax(capsys, "generate", *named, "--prompts", str(prompts),
                            "--max-new-tokens", "8")
  assert code == 0, err
  results = [json.loads(line) for line in out.splitlines()]
  assert [(r["adapter"], r["prompt"]) for r in results] == [
      (row.get("adapter"), row["prompt"]) for row in ROWS]
  for result in results:  # greedy: the reply `generate --adapter DIR --prompt` gives alone
    alone = ["--adapter", str(adapters / result["adapter"])] if result["adapter"] else []
    code, single, err = lora_jax(capsys, "generate", *alone, "--prompt", result["prompt"],
                                 "--max-new-tokens", "8")
    assert code == 0, err
    assert single == result["prompt"] + result["completion"] + "\n"
  # The adapters change the reply, so a row run with the other's would have failed.
  assert results[0]["completion"] != results[2]["completion"]

  written = tmp_path / "completions.jsonl"
  code, out, err = lora_jax(capsys, "generate", *named, "--prompts", str(prompts),
                            "--max-new-tokens", "8", "--output", str(written))
  assert code == 0, err
  assert [json.loads(line) for line in written.read_text().splitlines()] == results
  code, _, err = lora_jax(capsys, "generate", *named, "--prompts", str(prompts),
                          "--output", str(written))
  assert code == 2 and "exists: refusing to overwrite it" in err
  assert [json.loads(line) for line in written.read_text().splitlines()] == results


def test_chat_prompts_take_their_own_system_message(adapters, tmp_path):
  """With `chat` a line's prompt is the user's message after its own `system`, or the
  default one; a BPE tokenizer with a chat template stands in for the byte tokenizer (the
  two systems have as many tokens: one compiled program serves both rows alone)."""
  import tiny_hf
  section = ModelSection(tokenizer=str(tiny_hf.make_tokenizer(tmp_path / "tokenizer")))
  prompts = read_prompts(write_jsonl(tmp_path / "chat.jsonl", [
      {"prompt": "Define LAWYER.", "adapter": "a", "system": "Answer in verse."},
      {"prompt": "Define LAWYER.", "adapter": "a"}]))
  default = "Answer in prose."
  replies = serve.generate_batch(section, prompts, adapters={"a": str(adapters / "a")},
                               chat=True, system=default, max_new_tokens=6)
  for prompt, reply in zip(prompts, replies):
    assert reply == serve.generate_text(section, prompt.prompt, adapter=str(adapters / "a"),
                                      chat=True, system=prompt.system or default,
                                      max_new_tokens=6)
  assert replies[0] != replies[1]


def test_sampled_prompts_draw_as_they_would_alone(adapters):
  """Sampled, each row draws from its own key (its line's seed, else the run's): every reply
  is the one `generate_text` samples for that prompt, adapter and seed alone."""
  rows = [("LAWYER, n. One skilled in", "a", 7), ("And the LORD", None, None),
          ("LAWYER, n. One skilled in", "a", 8)]
  prompts = [Prompt(text, name, None, seed, f"line {i}")
             for i, (text, name, seed) in enumerate(rows)]
  sampling = dict(max_new_tokens=6, temperature=1.0, top_p=0.95)
  section = ModelSection()
  replies = serve.generate_batch(section, prompts, adapters={"a": str(adapters / "a")}, seed=3,
                                 **sampling)
  for (text, name, seed), reply in zip(rows, replies):
    assert reply == serve.generate_text(section, text, adapter=name and str(adapters / name),
                                        seed=3 if seed is None else seed, **sampling)
  assert replies[0] != replies[2]  # same prompt and adapter, another seed


@pytest.mark.parametrize("lines, argv, message", [
    ([ROWS[0], {"prompt": "x", "adapter": "c"}], [],
     r"prompts.jsonl, line 2: no adapter named 'c'; the adapters are \['a', 'b'\]"),
    (["{not json"], [], "prompts.jsonl, line 1: not valid JSON"),
    ([ROWS[0], {"adapter": "a"}], [], 'line 2: no "prompt"'),
    ([{"prompt": "x", "adaptor": "a"}], [], r"line 1: unknown keys \['adaptor'\]"),
    ([{"prompt": "x", "system": "Be brief."}], [], "line 1: a system message needs chat"),
    ([{"prompt": "x", "seed": "1"}], [], r"line 1: \"seed\" is '1'; expected an int"),
    ([], [], "holds no prompts"),
    ([ROWS[0]], ["--adapter", "a=elsewhere"], "the name 'a' is given twice"),
    ([ROWS[0]], ["--prompt", "x"], "--prompt and --prompts both given"),
    ([ROWS[0]], ["--adapter", "{misfit}"], "each adapter is NAME=DIR"),
    ([ROWS[0]], ["--adapter", "=x"], "each adapter is NAME=DIR"),
    ([ROWS[0]], ["--adapter", "x/y=x"], "adapter name 'x/y': must not contain '/'"),
    ([{"prompt": "x", "adapter": "bad"}], ["--adapter", "bad={misfit}"],
     "adapter 'bad': adapter 'layers_0/self_attn/q_proj/lora_a' does not fit kernel"),
])
def test_bad_prompts_and_adapters_are_one_line_errors(adapters, tmp_path, capsys, lines, argv,
                                                      message):
  prompts = write_jsonl(tmp_path / "prompts.jsonl", lines)
  argv = [a.format(misfit=adapters / "misfit") for a in argv]
  code, _, err = lora_jax(capsys, "generate", "--adapter", f"a={adapters / 'a'}", "--adapter",
                          f"b={adapters / 'b'}", "--prompts", str(prompts), *argv)
  assert code == 2 and err.count("\n") == 1 and err.startswith("lora-jax generate: error:")
  assert re.search(message, err), err


@pytest.mark.parametrize("argv, message", [
    (["--adapter", "a={a}", "--adapter", "b={a}"], "several --adapter NAME=DIR go with --prompts"),
    (["--adapter", "a=nowhere"], "no such directory; NAME=DIR names adapters for --prompts"),
    (["--output", "out.jsonl"], "--output writes the results of --prompts"),
])
def test_single_prompt_usage_errors(adapters, capsys, argv, message):
  argv = [a.format(a=adapters / "a") for a in argv]
  code, _, err = lora_jax(capsys, "generate", "--prompt", "x", *argv)
  assert code == 2 and err.startswith("lora-jax generate: error:") and message in err


# --- train with adapters ---------------------------------------------------------------------

COMMON = ["data.seq_len=32", "train.batch_size=8", "train.eval_every=0", "train.eval_batches=1",
          "train.save_every=100", "train.warmup_steps=1", "train.learning_rate=0.01",
          "lora.targets=[q_proj]"]  # few adapted layers: quick compiles
ADAPTERS = "adapters={a: {}, b: {rank: 1, targets: [q_proj, v_proj]}}"


@pytest.fixture(scope="module")
def data(tmp_path_factory):
  """Devil's Dictionary entries, alternately for adapter `a` and `b`, and each one's alone."""
  root = tmp_path_factory.mktemp("data")
  import tiny_hf
  text = "\n".join(tiny_hf.corpus_lines(keep_blank=True))
  entries = [p.strip() for p in re.split(r"\n\s*\n", text) if p.strip()][50:110]
  rows = [{"text": entry, "adapter": "ab"[i % 2]} for i, entry in enumerate(entries)]
  write_jsonl(root / "mixed.jsonl", rows)
  for name in "ab":  # the adapter field is ignored by a single-adapter run
    write_jsonl(root / f"{name}.jsonl", [r for r in rows if r["adapter"] == name])
  return root


@pytest.fixture(scope="module")
def runs(data, tmp_path_factory):
  """A two-adapter run of 2 steps resumed to 3 (writing PEFT and merged exports the second
  time), and single-adapter runs of 3 steps on each adapter's rows."""
  root = tmp_path_factory.mktemp("runs")

  def go(*argv):  # a module fixture has no capsys: stdout through a buffer
    buffer = io.StringIO()
    with contextlib.redirect_stdout(buffer):
      code = cli.main(["train", "--no-progress", *COMMON, *argv])
    assert code == 0
    return buffer.getvalue()

  mixed = [f"data.train={data / 'mixed.jsonl'}", ADAPTERS, f"output_dir={root / 'multi'}"]
  first = go(*mixed, "train.steps=2", "export.merged=false")
  second = go(*mixed, "train.steps=3", "export.peft=true")
  single = {"a": go(f"data.train={data / 'a.jsonl'}", f"output_dir={root / 'a'}",
                    "train.steps=3", "export.merged=false"),
            "b": go(f"data.train={data / 'b.jsonl'}", "lora.rank=1",
                    "lora.targets=[q_proj, v_proj]", f"output_dir={root / 'b'}",
                    "train.steps=3", "export.merged=false")}
  return root, first, second, single


def _losses(out, pattern):
  return {m.group(1): float(m.group(2)) for m in re.finditer(pattern, out)}


def test_each_adapter_trains_as_a_run_of_its_own_and_resumes(runs):
  root, first, second, single = runs
  assert "resuming from step 2" in second
  saved = lj.AdapterSet.load(root / "multi" / "adapters")
  assert saved.names == ("a", "b")
  for name in "ab":
    ref, ref_config = checkpoint.load_adapter(root / name / "adapter")
    got, config = saved[name]
    assert config == ref_config  # b: the lora section with its rank and targets
    assert jax.tree.structure(got) == jax.tree.structure(ref)
    assert config.rank == (8 if name == "a" else 1)
    # AdamW divides each gradient by its running size, so where a gradient is near zero (A's
    # while B is near its zero start) the stack's float32 round-off can move a few elements
    # (seen: 4 of 78k) by up to ~1e-4; a slot trained on the wrong rows is off by ~1e-2.
    diffs = np.concatenate([np.abs(np.asarray(a) - np.asarray(b)).ravel()
                            for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(ref))])
    assert diffs.max() < 1e-3 and np.mean(diffs > 1e-5) < 1e-3, (name, diffs.max())
    # Each adapter's eval losses are its own run's (its held-out rows, its own init).
    before = _losses(first, r"eval loss \((\w)\): ([\d.]+) ->")[name]
    alone_before, alone_after = map(float, re.search(r"eval loss: ([\d.]+) -> ([\d.]+)",
                                                     single[name]).groups())
    assert before == alone_before
    after = _losses(second, r"(?:after: |, )(\w) ([\d.]+)")[name]
    assert abs(after - alone_after) <= 2e-4 and after < before


def test_exports_hold_every_adapter(runs):
  """`export.peft` writes PEFT's multi-adapter layout; the merged model of each adapter is
  its base + adapter, folded."""
  root, *_ = runs
  saved = lj.AdapterSet.load(root / "multi" / "adapters")
  peft = lj.AdapterSet.import_peft(root / "multi" / "peft")
  assert peft.names == ("a", "b")
  host = lambda tree: jax.tree.map(np.asarray, tree)
  base = host(bases.resolve(ModelSection()).load()[1])
  for name in "ab":
    for x, y in zip(jax.tree.leaves(peft[name][0]), jax.tree.leaves(saved[name][0])):
      np.testing.assert_allclose(x, y, rtol=1e-6, atol=1e-7)
    merged = bases.resolve(ModelSection(base=str(root / "multi" / "merged" / name))).load()[1]
    expected = lj.merge(lj.combine(host(saved[name][0]), base), saved[name][1])
    for x, y in zip(jax.tree.leaves(merged), jax.tree.leaves(expected)):
      np.testing.assert_allclose(x, y, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("rows, argv, message", [
    ([{"text": "x", "adapter": "a"}, {"text": "y", "adapter": "c"}], [ADAPTERS],
     r"bad.jsonl, line 2: \"adapter\" is 'c', not one of the run's adapters \(a, b\)"),
    ([{"text": "x", "adapter": "a"}], [ADAPTERS], "adapter 'b' has no rows in"),
    ([{"text": "x", "adapter": "a"}], [ADAPTERS, "data.adapter_key=who"],
     'line 1: no "who" field naming the adapter the row trains'),
    ([{"text": "x", "adapter": 3}], [ADAPTERS], 'line 1: "adapter" is int'),
    ([], [ADAPTERS, "data.train=builtin:devil"], "plain text has no \"adapter\" field"),
    ([], ["data.adapter_key=adapter"], "data.adapter_key='adapter' names the field"),
    ([], [ADAPTERS, "adapters.b={dropout_rate: 0.1}"], "dropout_rate differs"),
    ([], [ADAPTERS, "adapters.b={trainable: [norm]}"], "adapters.b: trainable="),
    ([], [ADAPTERS, "lora.init=loftq", "model.quantize=nf4"], "adapters.a: init=loftq"),
    ([], ["adapters=[a, a]"], r"adapters: \['a'\] listed twice"),
    ([], ["adapters={a: {rnak: 2}}"], "adapters.a: unknown LoRA config key 'rnak'"),
])
def test_bad_adapter_runs_are_one_line_errors(tmp_path, capsys, rows, argv, message):
  path = write_jsonl(tmp_path / "bad.jsonl", rows)
  code, _, err = lora_jax(capsys, "train", *COMMON, f"data.train={path}", *argv,
                          f"output_dir={tmp_path / 'out'}")
  assert code == 2 and err.count("\n") == 1 and err.startswith("lora-jax train: error:")
  assert re.search(message, err), err


def test_adapters_refuse_pretraining_and_another_runs_directory(runs, data, capsys):
  root, *_ = runs
  code, _, err = lora_jax(capsys, "pretrain", ADAPTERS, f"data.train={data / 'mixed.jsonl'}")
  assert code == 2 and "pretrain trains every param of one model" in err
  # The run of `runs` with one adapter changed: its checkpoints cannot resume this one.
  code, _, err = lora_jax(capsys, "train", *COMMON, "adapters={a: {}, b: {rank: 2}}",
                          f"data.train={data / 'mixed.jsonl'}", f"output_dir={root / 'multi'}")
  assert code == 2 and "holds a different run's checkpoints" in err


def test_info_counts_each_adapter(capsys):
  code, out, err = lora_jax(capsys, "info", *COMMON, ADAPTERS)
  assert code == 0, err
  # The shipped model: 4 layers; q_proj and v_proj are 128 x 128 and 128 x 64.
  assert "adapter a: 8,192 params in 4 layers" in out  # rank 8 on q_proj: 4 x 8 x 256
  assert "adapter b: 1,792 params in 8 layers" in out  # rank 1: 4 x (256 + 192)
  assert "trainable: 9,984" in out and "adapted layers (8):" in out


def test_eval_data_is_split_by_adapter_too(data, tmp_path):
  """With `data.eval`, each adapter is evaluated on the eval rows that name it."""
  from lora_jax import data as data_lib
  from lora_jax import recipe
  held = write_jsonl(tmp_path / "held.jsonl", [{"text": "ABSURDITY, n.", "adapter": "b"},
                                               {"text": "LAWYER, n.", "adapter": "a"}])
  cfg = recipe.load(None, [*COMMON, ADAPTERS, f"data.train={data / 'mixed.jsonl'}",
                           f"data.eval={held}"])
  tokenizer = data_lib.ByteTokenizer()
  splits = stacked_run._adapter_datasets(cfg, tokenizer, ["a", "b"])
  for name, text in (("a", "LAWYER, n."), ("b", "ABSURDITY, n.")):
    alone = data_lib.pack([data_lib.tokenize(data_lib.Example("", text), tokenizer)], 32)
    for key, value in alone.items():
      np.testing.assert_array_equal(splits[name][1][key], value)
  write_jsonl(held, [{"text": "LAWYER, n.", "adapter": "a"}])
  with pytest.raises(ValueError, match=f"adapter 'b' has no rows in {held}"):
    stacked_run._adapter_datasets(cfg, tokenizer, ["a", "b"])
