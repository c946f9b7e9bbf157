"""Which kernels the split forward runs: attention implementations, compiled fused elementwise ops."""
