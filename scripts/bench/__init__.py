"""The parts of scripts/benchmark.py: common helpers, data and training, reconstruction, report."""
