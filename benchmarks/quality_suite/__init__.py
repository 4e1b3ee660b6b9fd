"""The quality suite's parts (benchmarks/quality.py runs it): tasks (the data), methods (the adapters), loops
(one training run)."""
