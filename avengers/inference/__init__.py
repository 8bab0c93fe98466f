"""Prefill + constant-cache decode for every registry variant."""
