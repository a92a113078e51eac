import importlib.util
from pathlib import Path


def test_the_benchmarks_time_clipengine_with_its_bytecode_compiled_as_an_install_has_it():
    from clipengine.bench._install import PACKAGE_FOLDERS, compile_clipengine

    root = Path(__file__).resolve().parents[2]
    sources = [root / folder / "config.py" if folder == "engine" else root / folder / "__init__.py" for folder in PACKAGE_FOLDERS]
    for source in sources:
        Path(importlib.util.cache_from_source(str(source))).unlink(missing_ok=True)
    compile_clipengine()
    for source in sources:
        compiled = Path(importlib.util.cache_from_source(str(source)))
        assert compiled.is_file() and compiled.stat().st_mtime >= source.stat().st_mtime, source
