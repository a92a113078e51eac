"""The whole job: ``job`` sequences the stages and records them in ``manifest`` (fingerprints,
timings, resume); ``summary`` writes the one-page ``summary.md``."""
