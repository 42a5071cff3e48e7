"""smallfour: Mistral Small 4 in JAX/Flax NNX."""

from smallfour import platforms

platforms.quiet_libtpu_without_tpus()
