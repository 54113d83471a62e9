import os

# Multi-process tests on 2 cores are 7x slower without this (ENVIRONMENT.md).
os.environ.setdefault("OMP_NUM_THREADS", "1")
