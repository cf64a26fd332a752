"""Hugging Face interop: Llama checkpoints and their tokenizers in, PEFT adapters out and in,
merged safetensors out.

>>> from lora_jax import hf
>>> hf.hf_module("layers_0/self_attn/q_proj"), hf.jax_module("lm_head")
('model.layers.0.self_attn.q_proj', 'lm_head')

Reading and writing need only `safetensors`; transformers, peft and torch
are needed only to use the files (the `hf` extra).
"""

from lora_jax.hf.llama import (export_merged_safetensors, hf_module, jax_module, llama_config,
                               load_llama, save_llama)
from lora_jax.hf.peft import ServingWarning, export_peft, import_peft
from lora_jax.hf.tokenizer import HFTokenizer, load_tokenizer

__all__ = ["HFTokenizer", "ServingWarning", "export_merged_safetensors", "export_peft",
           "hf_module", "import_peft", "jax_module", "llama_config", "load_llama",
           "load_tokenizer", "save_llama"]
