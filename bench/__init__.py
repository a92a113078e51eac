"""Benchmarks: each script measures one clipengine stage against its named peer in the same run.

Run one as a script (``python bench/encode.py --help``) or through ``clipengine bench NAME``.
"""
