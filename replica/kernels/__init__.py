"""Every Triton kernel, a file each, matching tests/interpreted_kernels.py file for file."""
