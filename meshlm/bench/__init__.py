"""Benchmarks: ``meshlm bench throughput`` (offline, rank 0's coordinator in this process) and
``meshlm bench serve`` (a load generator against any OpenAI-compatible completions server).

Both report what the field reports: request and token throughput, TTFT, TPOT, ITL and end-to-end
latency at mean/p50/p90/p99, as a table, a JSON file and a PNG plot.
"""
