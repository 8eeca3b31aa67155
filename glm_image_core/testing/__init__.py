"""Test checkpoints: random weights in the official layout, tiny to full size."""
