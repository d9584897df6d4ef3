"""The decoder-only transformer, its training loop and generation. Plain PyTorch."""
