"""Reward-guided sampling without training: soft value-based decoding (SVDD) and its baselines."""
