"""Field trials: the product behind ``spar-trial`` and ``make demo``.

A trial runs a whole simulated site (broker, nodes through the lossy link, the real aggregator),
leaves a folder a report can be rebuilt from, and scores the stored results against the ground
truth. It may import the units and ``testbed``, never ``benchmarks`` (which builds on it).
"""
