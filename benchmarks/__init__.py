"""Performance measurements of serving and training (see benchmarks/README.md); not tests."""
