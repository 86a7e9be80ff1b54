"""The benchmarks behind ``spar-bench``: bandwidth, loss, latency, overload, faults, fuzzing,
objectives, quantization and model checks, each writing a result file to ``benchmarks/results/``.

Built on ``trials`` (field trials) and ``testbed`` (brokers, aggregator process, tiny models);
nothing below imports this package.
"""
