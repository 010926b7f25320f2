"""Helpers for tests and benchmarks: tiny diffusers models of every family, random denoisers."""
