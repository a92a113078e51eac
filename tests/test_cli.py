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
