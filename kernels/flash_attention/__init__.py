"""Flash attention: one mask description, a jnp reference, Pallas kernels, and `api.attend`."""
