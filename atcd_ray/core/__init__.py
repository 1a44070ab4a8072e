"""The pure-PyTorch core: threat model, attacks, losses, models, methods, engine, checkpoints.

Nothing under this package imports ray or ffcv (tests/test_layering.py enforces it).
"""
