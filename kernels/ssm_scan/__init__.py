"""Selective scans (Mamba1 selective scan, Mamba2 SSD): a jnp reference, Pallas kernels, `api`."""
