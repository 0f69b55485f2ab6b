"""Shipped, typed fakes and fixture builders for tests, demos and benchmarks."""
