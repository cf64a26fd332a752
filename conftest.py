"""Test environment: 8 simulated CPU devices and no implicit rank promotion.

The suite compiles thousands of small programs (every eager op with a new
shape is one), and at its shapes LLVM's optimization passes cost more time
than they save: XLA:CPU's backend optimization level 0 makes the suite about
a third faster. XLA's graph passes (fusion, layout, buffer assignment, cost
analysis) are the same, so compiled FLOPs and memory plans are too; float
results may differ from the default level's in the last bits (reductions are
vectorized differently), and every comparison in the suite is between
programs compiled at the same level.
Subprocesses the tests start inherit it.

Strict dtype promotion is switched on per test module where the library
promises it (the layers), not globally: optax itself relies on standard
promotion.
"""

import os

# Must happen before jax is imported anywhere.
os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
    " --xla_backend_optimization_level=0").strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402

jax.config.update("jax_numpy_rank_promotion", "raise")
