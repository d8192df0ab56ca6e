"""Pallas kernels, each beside its plain jax.numpy reference."""
