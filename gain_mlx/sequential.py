"""``python -m gain_mlx.sequential``: runs :mod:`gain_mlx.experiments.sequential` (moved there
with the rest of the research harness)."""

import runpy

if __name__ == "__main__":  # as __main__, so that policy.start may re-execute it
    runpy.run_module("gain_mlx.experiments.sequential", run_name="__main__", alter_sys=True)
