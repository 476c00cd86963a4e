"""JAX Pallas kernels, installed as unmask.pallas (sources live in pallas/)."""
