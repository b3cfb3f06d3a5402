"""Reproducible benchmarks of Affinity: model quality on public data, serving and reliability."""
