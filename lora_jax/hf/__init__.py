"""Hugging Face interop: checkpoints (Llama, Mistral, Qwen 2 / 2.5, Qwen 3, Gemma 2,
Gemma 3) and their tokenizers in, PEFT adapters out and in, merged safetensors out.
`load_llama` reads any of them by `config.json`'s `model_type`.

>>> from lora_jax import hf
>>> hf.hf_module("layers_0/self_attn/q_proj"), hf.jax_module("lm_head")
('model.layers.0.self_attn.q_proj', 'lm_head')

Reading and writing need only `safetensors`; transformers, peft and torch
are needed only to use the files (the `hf` extra).
"""

from lora_jax.hf.checkpoints import (export_merged_safetensors, hf_module, jax_module,
                                     load_llama, model_config, save_llama)
from lora_jax.hf.gemma import gemma_config
from lora_jax.hf.llama import llama_config
from lora_jax.hf.peft import ServingWarning, export_peft, import_peft
from lora_jax.hf.tokenizer import HFTokenizer, load_tokenizer

__all__ = ["HFTokenizer", "ServingWarning", "export_merged_safetensors", "export_peft",
           "gemma_config", "hf_module", "import_peft", "jax_module", "llama_config",
           "load_llama", "load_tokenizer", "model_config", "save_llama"]
