"""The README's quick-start runs exactly as written (every python block except the one needing a real checkpoint),
and its first two lines are the set-up/main-job and test commands that .ci/run uses."""

import pathlib
import re

README = (pathlib.Path(__file__).resolve().parents[1] / "README.md").read_text()


def test_quick_start_runs_as_written(capsys):
    # skipped: blocks needing a real checkpoint or a running `m1jax serve` (tests/test_server.py runs that client)
    blocks = [b for b in re.findall(r"```python\n(.*?)```", README, re.S)
              if "/path/to/" not in b and "localhost:8000" not in b]
    assert len(blocks) >= 2
    namespace: dict = {}
    for block in blocks:
        exec(compile(block, "README.md", "exec"), namespace)  # noqa: S102
    out = capsys.readouterr().out
    assert "(1, 4, 512)" in out and "length" in out


def test_readme_opens_with_the_two_commands():
    first = re.search(r"```bash\n(.*?)```", README, re.S).group(1).strip().splitlines()
    assert len(first) == 2 and "m1jax generate" in first[0] and "pytest" in first[1]
    ci = (pathlib.Path(__file__).resolve().parents[1] / ".ci" / "run").read_text()
    assert first[1].replace(".venv/bin/python -m pytest -q", "") == "" and ".venv/bin/python -m pytest -q" in ci
