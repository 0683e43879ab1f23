"""The research harness, apart from the product CLIs: ``sequential`` (domain after
domain, every method against its baselines) and ``probe`` (a knowledge probe scored by
the loss of each answer). ``python -m gain_mlx.sequential`` / ``gain_mlx.probe`` run them.
"""
