"""Stage 2, annotate: embeddings → metadata, by zero-shot classification with prompt ensembles.

- ``schemas``: attribute → classes → prompts, YAML as data, hashed.
- ``class_embeddings``: a schema's text side (prompt embeddings cached per model).
- ``stage``: labelling (``annotate_dir``, ``label_arrays``) and the metadata tables it writes.
- ``thresholds``: decision thresholds of binary attributes; ``evaluate``: label quality.
- ``search``, ``search_index``: text → image retrieval over the same embeddings.
"""
