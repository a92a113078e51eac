"""Runtimes behind one ``Encoder`` interface (``clipengine.bindings.base.Encoder``).

Backends are chosen by name from a table of ``"module:Class"`` strings and imported
on first use, so that naming a backend never imports the others' heavy packages.
"""
