"""Using a base model with its adapters: generation and merged exports.

`generate_text` continues one prompt with the base or base + one adapter;
`generate_batch` runs many prompts, each with its own adapter (or the base),
as one stacked batch; `merge_adapter` folds an adapter into a new model of the
base's kind. Adapters are lora_jax adapter directories or PEFT ones. The base
is spread over every device (fsdp), so bases larger than one chip fit.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from lora_jax import bases, checkpoint, sharding
from lora_jax.config import LoRAConfig
from lora_jax.formats import Prompt
from lora_jax.inject import inject, quantized_model
from lora_jax.models.generation import generate
from lora_jax.recipe import ModelSection, check_float_dtype
from lora_jax.stack import stack_adapters
from lora_jax.tree import combine, merge


def _load_sharded(base_model: bases.Base, adapter: str | None) -> tuple[Any, ...]:
  """The base over every device (fsdp), so models larger than one chip fit, with an
  adapter replicated beside it: `(model, params, adapter config or None)`. A quantized
  base whose blocks would straddle that many shards takes the largest fsdp size they fit
  (the other devices hold copies)."""
  n = jax.device_count()
  abstract = base_model.abstract_params(base_model.model(), jnp.zeros((1, 1), jnp.int32))
  for fsdp in (d for d in range(n, 0, -1) if n % d == 0):
    mesh = sharding.make_mesh(n // fsdp, fsdp, 1)
    try:
      sharding.param_shardings(abstract, mesh)
      break
    except ValueError:
      if fsdp == 1:
        raise
  model, params = base_model.load(mesh)
  if adapter is None:
    return model, params, None
  adapters, config = load_adapter(adapter, params)
  replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
  adapters = jax.device_put(adapters, replicated)
  return model, combine(adapters, params), config


def load_adapter(path: str, params: Any) -> tuple[Any, LoRAConfig]:
  """A lora_jax adapter directory, or a PEFT adapter directory, checked against `params`."""
  if (Path(path) / "adapter_config.json").is_file():
    from lora_jax import hf
    adapters, config = hf.import_peft(path)
    checkpoint.check_fits(adapters, nn.unbox(params), config)
    return adapters, config
  return checkpoint.load_adapter(path, target=params)


def generate_text(section: ModelSection, prompt: str, *, adapter: str | None = None,
                  chat: bool = False, system: str | None = None, max_new_tokens: int = 200,
                  temperature: float = 0.0, top_p: float = 1.0, seed: int = 0) -> str:
  """Continues `prompt` (or answers it, `chat`) with the base model, or base + adapter.

  Args:
    section: the base model.
    prompt: the text to continue, or with `chat` the user's message.
    adapter: a lora_jax adapter directory or a PEFT adapter directory.
    chat: render `prompt` as a user turn (after `system`, if given) with the
      tokenizer's chat template and return the assistant's reply.
    system: a system message for `chat`.
    max_new_tokens: at most this many tokens; decoding stops at the
      tokenizer's end-of-sequence (and end-of-turn) ids.
    temperature: 0 for greedy decoding, else the sampling temperature.
    top_p: nucleus sampling's probability mass.
    seed: the sampling seed; the same prompt, adapter and seed give the same
      text here as in a `generate_batch` row.

  Returns:
    The new text (without the prompt), special tokens removed.
  """
  base_model = bases.resolve(section)
  tokenizer = base_model.tokenizer()
  ids = jnp.asarray(_prompt_ids(tokenizer, prompt, chat, system), jnp.int32)[None, :]
  model, params, config = _load_sharded(base_model, adapter)
  if config is not None:
    model = inject(model, config)
  elif base_model.quantize != "none":
    model = quantized_model(model)
  out = generate(model, params, ids, max_new_tokens=max_new_tokens, temperature=temperature,
                 top_p=top_p, rng=_row_keys([seed]), stop_ids=tokenizer.stop_ids, vocab_size=tokenizer.vocab_size)
  return _reply(tokenizer, out[0, ids.shape[1]:])


def _row_keys(seeds: Sequence[int]) -> jax.Array:
  """A sampling key per row, each of its own seed, so a row draws the same
  tokens whatever else is in its batch."""
  return jnp.stack([jax.random.key(s) for s in seeds])


def _prompt_ids(tokenizer, prompt: str, chat: bool, system: str | None, where: str = ""
                ) -> np.ndarray:
  """The ids generation starts from: the prompt after BOS, or with `chat` the rendered
  conversation up to the assistant's turn. `where` prefixes errors."""
  if chat:
    messages = ([{"role": "system", "content": system}] if system else []) + [
        {"role": "user", "content": prompt}]
    # The template writes its own BOS where the model expects one.
    ids = tokenizer.encode(tokenizer.render_chat(messages, add_generation_prompt=True))
  else:
    if system:
      raise ValueError(f"{where}a system message needs chat (--chat)")
    ids = tokenizer.encode(prompt, bos=True)
  if not len(ids):
    raise ValueError(f"{where}nothing to continue: the prompt is empty and the tokenizer adds "
                     "no BOS; give a prompt")
  return np.asarray(ids, np.int32).ravel()


def _reply(tokenizer, new: Any) -> str:
  """New ids as text, up to the first stop id, special tokens removed."""
  new = np.asarray(new)
  ends = np.flatnonzero(np.isin(new, tokenizer.stop_ids))
  return tokenizer.decode(new[:ends[0]] if ends.size else new)


def generate_batch(section: ModelSection, prompts: Sequence[Prompt], *,
                   adapters: Mapping[str, str] | None = None, chat: bool = False,
                   system: str | None = None, max_new_tokens: int = 200,
                   temperature: float = 0.0, top_p: float = 1.0, seed: int = 0) -> list[str]:
  """Runs many prompts, each with its own adapter (or the base), as one batch.

  The named adapters are stacked (`lora_jax.stack_adapters`) on the base and
  every prompt, left-padded, runs with its adapter's id through one compiled
  `generate`. Each reply is the one `generate_text` gives for that prompt,
  adapter and seed alone (up to float round-off in a near tie): sampled, each
  row draws from its own key, of its prompt's `seed` or else `seed`.

  Args:
    section: the base model.
    prompts: from `lora_jax.formats.read_prompts`; each names an adapter of
      `adapters`, or None for the base.
    adapters: name -> a lora_jax or PEFT adapter directory.
    chat: each prompt is a user message (after its `system`, else `system`).
    system: the system message of prompts that give none (with `chat`).
    max_new_tokens, temperature, top_p: as for `generate_text`.
    seed: the sampling seed of prompts that give none.

  Returns:
    Each prompt's new text, in order.

  Raises:
    ValueError: naming the line, for a prompt naming an adapter not in
      `adapters`, or an empty prompt; naming the adapter, for one that does
      not fit the base or cannot be stacked.
  """
  adapters = dict(adapters or {})
  if not prompts:
    raise ValueError("no prompts to run")
  for p in prompts:
    if p.adapter is not None and p.adapter not in adapters:
      raise ValueError(f"{p.source}: no adapter named {p.adapter!r}; the adapters are "
                       f"{list(adapters) or 'none'} (null runs the base)")
  base_model = bases.resolve(section)
  tokenizer = base_model.tokenizer()
  ids = [_prompt_ids(tokenizer, p.prompt, chat, system if p.system is None else p.system,
                     f"{p.source}: ") for p in prompts]
  width = max(map(len, ids))
  prompt_ids = np.zeros((len(ids), width), np.int32)
  mask = np.zeros((len(ids), width), np.int32)
  for i, row in enumerate(ids):  # left-padded: every row's next token is at the end
    prompt_ids[i, width - len(row):] = row
    mask[i, width - len(row):] = 1
  model, params, _ = _load_sharded(base_model, None)
  kwargs = {}
  if adapters:
    loaded = {}
    for name, path in adapters.items():
      try:
        loaded[name] = load_adapter(path, params)
      except (ValueError, FileNotFoundError) as e:
        raise type(e)(f"adapter {name!r}: {e}") from None
    s = stack_adapters(model, loaded, jnp.zeros((1, 1), jnp.int32))
    mesh = jax.tree.leaves(params)[0].sharding.mesh
    stacked = jax.device_put(s.params, jax.sharding.NamedSharding(
        mesh, jax.sharding.PartitionSpec()))
    model, params = inject(model, s.spec), combine(stacked, params)
    kwargs["adapter_ids"] = s.ids([p.adapter for p in prompts])
  elif base_model.quantize != "none":
    model = quantized_model(model)
  out = generate(model, params, prompt_ids, attention_mask=mask, max_new_tokens=max_new_tokens,
                 temperature=temperature, top_p=top_p,
                 rng=_row_keys([seed if p.seed is None else p.seed for p in prompts]),
                 stop_ids=tokenizer.stop_ids, vocab_size=tokenizer.vocab_size,
                 model_kwargs=kwargs)
  out = np.asarray(out)
  return [_reply(tokenizer, row[width:]) for row in out]


def merge_adapter(section: ModelSection, adapter: str, output: str, *, dtype: str | None = None
                  ) -> Path:
  """Base + adapter folded into a new model of the base's kind (a Hugging Face
  checkpoint with its tokenizer files for Hugging Face bases)."""
  if dtype is not None:
    check_float_dtype(dtype, "--dtype")
  base_model = bases.resolve(section)
  _, params, config = _load_sharded(base_model, adapter)
  return base_model.save(output, merge(params, config, dtype=dtype), dtype=dtype)
