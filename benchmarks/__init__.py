"""Benchmarks, runnable as `daser-rag bench ...` or `python -m benchmarks.<name>`.

Every benchmark measures the modes it compares side by side in one run and prints ratios,
because this kind of machine is shared and noisy: absolute numbers drift, ratios hold.
"""
