"""The shared test bed: brokers, the aggregator as a process, tiny models and the machine record.

Tests, field trials and benchmarks all start brokers and aggregators the same way; this package is
that one way. It may import the deployable units (spar_wire, node_firmware_sim, edge_runtime,
export) but never ``trials`` or ``benchmarks``.
"""
