"""Benchmarks: serving throughput and latency against baselines (`seqserve bench serve`) and model quality
through the server per numeric variant (`seqserve bench quality`). Results and commands: bench/RESULTS.md.
"""
