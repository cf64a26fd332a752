"""Test environment: 8 simulated CPU devices and no implicit rank promotion.

Strict dtype promotion is switched on per test module where the library
promises it (the layers), not globally: optax itself relies on standard
promotion.
"""

import os

# Must happen before jax is imported anywhere.
os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402

jax.config.update("jax_numpy_rank_promotion", "raise")
