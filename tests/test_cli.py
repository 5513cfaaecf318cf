"""The command line reports bad input in one line (exit code 2), whatever the subcommand."""

import pytest

from m1jax.cli import main


@pytest.mark.parametrize("argv, names", [
    (["generate", "--model", "/nonexistent/model"], "/nonexistent/model"),
    (["generate", "--messages", "/nonexistent/chat.json", "--max-new-tokens", "2"], "/nonexistent/chat.json"),
    (["convert", "/nonexistent/hf", "/tmp/m1jax-never-written"], "/nonexistent/hf"),
    (["export", "/nonexistent/m1jax", "/tmp/m1jax-never-written"], "/nonexistent/m1jax"),
    (["train", "cispo", "--config", "/nonexistent/run.yaml"], "/nonexistent/run.yaml"),
    (["train", "sft", "--config", "/nonexistent/run.yaml"], "/nonexistent/run.yaml"),
])
def test_a_bad_path_is_one_line(argv, names, capsys):
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"m1jax {argv[0]}: error: ") and names in err
    assert "Traceback" not in err and err.strip().count("\n") == 0, err
