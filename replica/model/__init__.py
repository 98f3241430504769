"""Qwen3 (dense and MoE) in plain PyTorch: the CPU path, and the oracle of every GPU kernel."""
