"""``clipengine bench``: a group with one subcommand per benchmark script in ``bench/``.

Each script (``bench/<name>.py``) compares one stage with its peer in the same run; the subcommand
runs it in a fresh Python process with the given arguments (``--help`` shows the script's own
options). ``bench/`` is installed with the package as ``clipengine.bench``, so this works from a
wheel as well as from a source checkout.
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path

import click


def bench_dir() -> Path:
    """The folder of the benchmark scripts: ``bench/``, installed as ``clipengine.bench``."""
    import importlib.util

    spec = importlib.util.find_spec("clipengine.bench")
    return Path(spec.origin).parent if spec and spec.origin else Path(__file__).resolve().parents[2] / "bench"


def _scripts() -> dict[str, Path]:
    folder = bench_dir()
    if not folder.is_dir():
        return {}
    return {p.stem.replace("_", "-"): p for p in sorted(folder.glob("*.py")) if not p.name.startswith("_")}


def _summary(script: Path) -> str:
    try:
        doc = ast.get_docstring(ast.parse(script.read_text(encoding="utf-8"))) or ""
    except (OSError, SyntaxError):
        doc = ""
    return doc.strip().splitlines()[0] if doc.strip() else f"bench/{script.name}"


class BenchGroup(click.Group):
    def list_commands(self, ctx: click.Context) -> list[str]:
        return list(_scripts())

    def get_command(self, ctx: click.Context, name: str) -> click.Command | None:
        script = _scripts().get(name)
        if script is None:
            return None

        def run(args: tuple[str, ...]) -> None:
            from clipengine.interrupts import run_child

            code = run_child([sys.executable, str(script), *args])  # stopped, it stops the script too
            if code:
                sys.exit(code)

        return click.Command(
            name,
            callback=click.pass_context(lambda ctx: run(tuple(ctx.args))),
            help=f"{_summary(script)} (runs bench/{script.name}; --help shows its options)",
            short_help=_summary(script),
            context_settings={"ignore_unknown_options": True, "allow_extra_args": True},
            add_help_option=False,
        )


@click.group("bench", cls=BenchGroup)
def bench() -> None:
    """Throughput benchmarks, each against its reference peer in the same run.

    Run them one at a time (they measure the whole machine), e.g. under a lock.

    \b
    Example:
      flock /tmp/clipengine-bench.lock clipengine bench encode --images 256 --json
      clipengine bench encode --help
    """
