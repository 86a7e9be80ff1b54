"""Benchmarks, field-trial orchestration and the local-broker launcher."""
