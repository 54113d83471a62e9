"""Benchmarks: the pipeline-bubble bench (emulated compute, third-party baselines, simulator
calibration, traces and plots), the simulator's CLI and the engine's overhead against autograd.
They time schedules and engines; the studies that train many runs are in ``studies/``."""
