"""The ``clipengine`` command: a click group whose subcommands load on first use.

Each subcommand lives in its own module under ``clipengine.cli`` and only parses
options into its stage's config dataclass, calls the stage and prints. Modules
are imported only when their command runs (or when ``--help`` lists them: they
import click alone at top level), so ``clipengine --help`` never imports torch,
CuPy or TensorRT.
"""

from __future__ import annotations

import importlib
import sys

import click

# command name -> (module:function, one-line help shown by `clipengine --help`)
COMMANDS: dict[str, tuple[str, str]] = {
    "encode": ("clipengine.cli.encode:encode", "Encode images (or object crops) into CLIP embeddings."),
    "encode-text": ("clipengine.cli.encode:encode_text", "Encode text prompts into CLIP embeddings."),
    "annotate": ("clipengine.cli.annotate:annotate", "Label stored embeddings zero-shot with a prompt schema."),
    "sample": ("clipengine.cli.sample:sample", "Draw items of a run to label: a sheet, an offline labelling page."),
    "eval": ("clipengine.cli.evaluate:evaluate", "Compare labels with ground truth: accuracy, precision, recall, F1."),
    "search": ("clipengine.cli.search:search", "Text-to-image retrieval over stored embeddings."),
    "slices": ("clipengine.cli.slices:slices", "Find the top-K weak slices of a table with SliceLine."),
    "coverage": ("clipengine.cli.coverage:coverage", "Which combinations of conditions a table covers, misses or holds thinly."),
    "run": ("clipengine.cli.run:run", "The whole semantic test: encode, annotate, join errors, slice, coverage, report."),
    "compare": ("clipengine.cli.compare:compare", "Compare two runs: slices worse or better, new or gone; drift."),
    "report": ("clipengine.cli.report:report", "Write RUN/report.html for an existing run directory."),
    "bench": ("clipengine.cli.bench:bench", "Throughput benchmarks against the reference peers."),
    "export": ("clipengine.cli.export:export", "Write a model's image graph as ONNX (what TensorRT builds from)."),
}


class LazyGroup(click.Group):
    """A group that imports a subcommand's module only when that command is used."""

    def list_commands(self, ctx: click.Context) -> list[str]:
        return [name for name in COMMANDS if self._available(name)]

    @staticmethod
    def _available(name: str) -> bool:
        module_name = COMMANDS[name][0].split(":")[0]
        return importlib.util.find_spec(module_name) is not None

    def get_command(self, ctx: click.Context, name: str) -> click.Command | None:
        target = COMMANDS.get(name)
        if target is None or not self._available(name):
            return None
        module_name, attribute = target[0].split(":")
        return getattr(importlib.import_module(module_name), attribute)

    def format_commands(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        rows = [(name, COMMANDS[name][1]) for name in self.list_commands(ctx)]
        if rows:
            with formatter.section("Commands"):
                formatter.write_dl(rows)


@click.group(cls=LazyGroup, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(package_name="clipengine")
def cli() -> None:
    """clipengine: find where a vision model fails, in words.

    \b
    Example, the whole job on the sample dataset:
      clipengine run --dataset fashion-mnist
    Each stage also runs alone:
      clipengine encode photos/ --out emb/
      clipengine annotate emb/ --schema celeba --out emb/metadata.parquet
      clipengine slices table.parquet --error error
    """


MAX_MESSAGE_CHARS = 1000


def one_line(message) -> str:
    """A message as one printable line of bounded length: characters that came with data (a column or
    file name) and would break or garble the line are written as escapes (``\\n``, ``\\x1e``)."""
    text = str(message)
    if not text.isprintable():
        text = "".join(c if c.isprintable() else c.encode("unicode_escape").decode("ascii") for c in text)
    return text if len(text) <= MAX_MESSAGE_CHARS else text[:MAX_MESSAGE_CHARS - 1] + "…"


def _exit_without_collecting() -> None:
    """At the exit of a ``clipengine`` process: collect the young garbage (what the command just dropped,
    so its finalizers run), then freeze every older object so that the interpreter's teardown does not
    walk them. After a Numba kernel has loaded, over a hundred thousand objects are alive (Numba's type
    registries, many in reference cycles); collecting them at teardown is a noticeable part of a short
    command, for memory the operating system takes back anyway."""
    import gc

    gc.collect(1)
    gc.freeze()


def _exit_interrupted(cause: BaseException | None) -> None:
    """Exit after Ctrl-C (130) or SIGTERM (143, the shell's 128 + 15), saying that a rerun resumes."""
    from clipengine.errors import Terminated

    if isinstance(cause, Terminated):
        click.echo("clipengine: terminated (SIGTERM); finished work is kept, run the same command again to resume",
                   err=True)
        sys.exit(143)
    if isinstance(cause, KeyboardInterrupt):
        click.echo("clipengine: interrupted; finished work is kept, run the same command again to resume", err=True)
        sys.exit(130)
    click.echo("clipengine: aborted", err=True)
    sys.exit(130)


def main(argv: list[str] | None = None) -> None:
    """Entry point: user errors print one line and exit 2; no tracebacks for bad input. With ``argv``
    None (the process's own command line: the process is this command's) the interpreter's exit skips
    collecting the objects that live to the end (:func:`_exit_without_collecting`)."""
    from clipengine.errors import ClipengineError

    if argv is None:
        import atexit

        from clipengine.interrupts import stop_on_sigterm

        atexit.register(_exit_without_collecting)  # registered first: runs after every other exit handler
        stop_on_sigterm()  # a scheduler's stop ends the command as Ctrl-C does (clipengine.interrupts)
    try:
        code = cli.main(args=argv, prog_name="clipengine", standalone_mode=False)
    except click.exceptions.Abort as abort:  # click turns Ctrl-C (and SIGTERM's Terminated) into Abort
        _exit_interrupted(abort.__cause__)
    except click.ClickException as error:
        error.show()
        sys.exit(error.exit_code)
    except ClipengineError as error:
        click.echo(f"clipengine: error: {one_line(error)}", err=True)
        sys.exit(2)
    except KeyboardInterrupt as interrupt:
        _exit_interrupted(interrupt)
    except BrokenPipeError:
        sys.exit(0)
    except OSError as error:  # the storage, not the input: read-only, full, or not permitted
        where = f"{error.filename}: " if error.filename else ""
        click.echo(f"clipengine: error: {one_line(f'{where}{error.strerror or error}')}", err=True)
        sys.exit(1)
    sys.exit(code if isinstance(code, int) else 0)
