"""Hand-written kernels where XLA's own fall short (each with a jnp fallback)."""
