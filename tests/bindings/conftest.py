"""Backend tests use ``sample_photos``, ``tiny_clip`` and ``vit_b32_checkpoint`` from tests/fixtures_models.py."""
