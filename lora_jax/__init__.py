"""lora_jax: LoRA and DoRA adapters for JAX/Flax, built for TPU fine-tuning."""

from lora_jax.config import AdapterSpec, LoRAConfig, PathRule
from lora_jax.inject import init_adapters, inject, layouts, quantized_model, targets
from lora_jax.layers import LoRADense, LoRADenseGeneral, LoRAEinsum
from lora_jax.layout import Layout
from lora_jax.optim import optimizer
from lora_jax.quantize import (QuantizedKernel, dequantize_params, quantize_params,
                               requantize_like)
from lora_jax.tree import combine, count, merge, partition, split, summary

from lora_jax import distributed, hf, quantize, sharding, train  # noqa: E402  (modules: lj.sharding.make_mesh, ...)

__version__ = "0.1.0"

__all__ = [
    "AdapterSpec",
    "Layout",
    "LoRAConfig",
    "LoRADense",
    "LoRADenseGeneral",
    "LoRAEinsum",
    "PathRule",
    "QuantizedKernel",
    "combine",
    "count",
    "dequantize_params",
    "init_adapters",
    "inject",
    "layouts",
    "merge",
    "optimizer",
    "partition",
    "quantize_params",
    "quantized_model",
    "requantize_like",
    "split",
    "summary",
    "targets",
]
