import subprocess
import sys


def test_help_lists_commands_without_heavy_imports():
    code = (
        "import sys\n"
        "from clipengine.cli import cli\n"
        "from click.testing import CliRunner\n"
        "result = CliRunner().invoke(cli, ['--help'])\n"
        "assert result.exit_code == 0, result.output\n"
        "print(result.output)\n"
        "heavy = [m for m in ('torch', 'cupy', 'tensorrt', 'open_clip', 'onnxruntime', 'numba') if m in sys.modules]\n"
        "print('HEAVY', heavy)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert "HEAVY []" in out
    assert "Commands" in out


def test_every_listed_command_has_help_with_an_example():
    from click.testing import CliRunner

    from clipengine.cli import cli

    runner = CliRunner()
    names = cli.list_commands(None)
    assert names, "no command available"
    for name in names:
        result = runner.invoke(cli, [name, "--help"])
        assert result.exit_code == 0, (name, result.output)
        assert "Example" in result.output or "example" in result.output, name


def test_only_the_process_command_line_skips_collecting_at_exit():
    """`clipengine ...` (main() on the process's own argv) freezes the objects alive at its exit, so the
    interpreter's teardown does not walk Numba's object graph; main(argv) called by a program does not."""
    probe = ("import atexit, gc, sys\n"
             "atexit.register(lambda: print('FROZEN', gc.get_freeze_count() > 0))\n"
             "from clipengine.cli import main\n"
             "sys.argv = ['clipengine', '--help']\n"
             "main({})\n")
    for argv, frozen in (("None", True), ("['--help']", False)):
        run = subprocess.run([sys.executable, "-c", probe.format(argv)], capture_output=True, text=True)
        assert run.returncode == 0, run.stderr
        assert "Commands" in run.stdout and f"FROZEN {frozen}" in run.stdout


_SLEEPY_MODULE = (
    "import time\n"
    "import click\n"
    "@click.command()\n"
    "def sleepy():\n"
    "    print('READY', flush=True)\n"
    "    time.sleep(60)\n"
)
_RUN_SLEEPY = (
    "import sys\n"
    "from clipengine import cli\n"
    "cli.COMMANDS['sleepy'] = ('sleepy_command:sleepy', 'waits')\n"
    "sys.argv = ['clipengine', 'sleepy']\n"
    "cli.main()\n"
)


def _stopped_by(signal_number, folder) -> subprocess.CompletedProcess:
    """A `clipengine` process (its own entry point, running a command that waits) stopped by ``signal_number``."""
    import os

    (folder / "sleepy_command.py").write_text(_SLEEPY_MODULE)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(folder), os.environ.get("PYTHONPATH")]))}
    process = subprocess.Popen([sys.executable, "-c", _RUN_SLEEPY], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               text=True, env=env)
    assert process.stdout.readline().strip() == "READY", process.stderr.read()
    process.send_signal(signal_number)
    out, err = process.communicate(timeout=30)
    return subprocess.CompletedProcess(process.args, process.returncode, out, err)


def test_sigterm_and_ctrl_c_stop_a_command_with_one_line_saying_a_rerun_resumes(tmp_path):
    import signal

    terminated = _stopped_by(signal.SIGTERM, tmp_path)
    assert terminated.returncode == 143
    assert terminated.stderr.strip().splitlines()[-1] == (
        "clipengine: terminated (SIGTERM); finished work is kept, run the same command again to resume")
    assert "Traceback" not in terminated.stderr
    interrupted = _stopped_by(signal.SIGINT, tmp_path)
    assert interrupted.returncode == 130
    assert interrupted.stderr.strip().splitlines()[-1] == (
        "clipengine: interrupted; finished work is kept, run the same command again to resume")
