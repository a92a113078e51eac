"""Compute kernels: pure functions over arrays, each with a NumPy reference in the tests.

This package never imports ``clipengine`` (the engine); the engine imports it.
"""
