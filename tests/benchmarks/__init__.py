"""Speed benchmarks (pytest-benchmark) and the A/B regression gate, gate.py."""
