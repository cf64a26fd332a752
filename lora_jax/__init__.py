"""lora_jax: LoRA and DoRA adapters for JAX/Flax, built for TPU fine-tuning."""

from lora_jax.adapter_set import AdapterSet, switch_merged
from lora_jax.arithmetic import WeightedAdapter, weighted_adapter
from lora_jax.config import AdapterSpec, LoRAConfig, PathRule
from lora_jax.inject import init_adapters, inject, layouts, quantized_model, targets
from lora_jax.layers import LoRADense, LoRADenseGeneral, LoRAEinsum
from lora_jax.layout import Layout
from lora_jax.optim import optimizer
from lora_jax.quantize import QuantizedKernel
from lora_jax.quantized_base import dequantize_params, quantize_params, requantize_like
from lora_jax.mixed import StackSpec
from lora_jax.stack import AdapterStack, stack_adapters
from lora_jax.tree import combine, count, merge, partition, split, summary
from lora_jax.unmerge import merge_reversibly, unmerge

# Modules: lj.sharding.make_mesh, ...
from lora_jax import distributed, hf, quantize, quantized_base, sharding, train  # noqa: E402

__version__ = "0.1.0"

__all__ = [
    "AdapterSet",
    "AdapterSpec",
    "AdapterStack",
    "Layout",
    "LoRAConfig",
    "LoRADense",
    "LoRADenseGeneral",
    "LoRAEinsum",
    "PathRule",
    "QuantizedKernel",
    "StackSpec",
    "WeightedAdapter",
    "combine",
    "count",
    "dequantize_params",
    "init_adapters",
    "inject",
    "layouts",
    "merge",
    "merge_reversibly",
    "optimizer",
    "partition",
    "quantize_params",
    "quantized_model",
    "requantize_like",
    "split",
    "stack_adapters",
    "summary",
    "switch_merged",
    "targets",
    "unmerge",
    "weighted_adapter",
]
