"""`python -m lora_jax`: the `lora-jax` command."""

import sys

from lora_jax.cli import main

sys.exit(main())
