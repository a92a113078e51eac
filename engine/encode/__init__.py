"""Stage 1, encode: images or object crops → L2-normalized CLIP embeddings.

- ``models``: resolving ``--model/--pretrained/--weights`` to a checkpoint safely and loading it.
- ``inputs``: which files to encode (folders, list files, boxes tables).
- ``geometry``, ``decode``: one file → the model's (S, S, 3) uint8 input, as open_clip's preprocess.
- ``pipeline``: batches decoded in threads, overlapped with the model; ``gpu_decode``: JPEGs on the
  encoder's device (nvJPEG on a GPU) and the choice of decoder (``--decode``).
- ``encoders``: the encoder of a configuration (backend, device, precision) from :mod:`clipengine.bindings`;
  ``auto``: how ``auto`` chooses on the CPU, from a measurement of the CPU.
- ``stage``: ``encode_items``, resumable, writing the outputs through :mod:`clipengine.artifacts`.
"""
