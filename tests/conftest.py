"""Test set-up: 8 simulated CPU devices (before any JAX backend use) and parsed absl flags
(grain workers read flags; ../shared/STACK.md G1, G6)."""

import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")

from absl import flags  # noqa: E402

flags.FLAGS.mark_as_parsed()
