"""Run untrusted Python (model-written code) in a separate, resource-limited process.

Every run is a fresh `python -I` (isolated mode: no user site, PYTHON* variables ignored, script dir not on
sys.path) in a new temporary directory used as cwd and HOME, in its own session (process group), with a
minimal environment (nothing of the trainer's environment, e.g. API tokens, is passed on) and no inherited file
descriptors. Nothing is ever `exec`-ed in the trainer's process.

Resource limits are applied with `resource.setrlimit` by a small bootstrap INSIDE the child interpreter before
the candidate code is compiled, not with `subprocess`'s `preexec_fn`: `preexec_fn` runs Python between fork and
exec and can deadlock when the parent has other threads (a JAX trainer always has). Limits (soft = hard, so the
candidate cannot raise them): CPU seconds (RLIMIT_CPU), address space (RLIMIT_AS), size of any file written
(RLIMIT_FSIZE; stdout/stderr go to files, so this also caps output), open files (RLIMIT_NOFILE), processes and
threads of the user (RLIMIT_NPROC), no core dumps. The parent enforces wall-clock timeouts and kills the whole
process group on timeout and after every run.

NOT enforced: network access (needs a network namespace / container / seccomp); file-system access beyond the
temp dir; RLIMIT_NPROC is ignored for root (and counts all processes of the uid otherwise); a child that calls
setsid() escapes the group kill. For untrusted models in production run this inside a container or
nsjail/bubblewrap, as an unprivileged user. Reward hacking against the harness (e.g. a program
that inspects its own interpreter state) is out of scope; simple exits (sys.exit, os._exit) before the tests run
are scored as failures.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import secrets
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence

_BOOTSTRAP = r"""
import json, resource, sys
cfg = json.loads(sys.argv[1])
for name, value in cfg["rlimits"]:
    resource.setrlimit(getattr(resource, name), (value, value))
if cfg["mode"] == "script":
    import runpy
    sys.argv = [cfg["solution"]]
    runpy.run_path(cfg["solution"], run_name="__main__")
else:
    import builtins, os
    nonce = sys.stdin.readline().strip()  # not in argv/env, where the candidate could simply read it
    progress = os.open(cfg["progress"], os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
    def note(tag, i):
        os.write(progress, f"{tag} {i} {nonce}\n".encode())
    with open(cfg["solution"], encoding="utf-8") as f:
        source = f.read()
    with open(cfg["tests"], encoding="utf-8") as f:
        tests = json.load(f)
    namespace = {"__name__": "solution", "__builtins__": builtins}
    exec(compile(source, "solution.py", "exec"), namespace)
    note("R", -1)
    for i in range(cfg["start"], len(tests)):
        note("S", i)
        try:
            exec(compile(tests[i], f"test_{i}.py", "exec"), namespace)
        except Exception:
            note("F", i)
        else:
            note("P", i)
"""


@dataclasses.dataclass(frozen=True)
class SandboxLimits:
    """Limits of one sandboxed run.

    timeout_s: wall clock for a script run, and for each phase of an assert run (module setup, each test).
    cpu_s: RLIMIT_CPU; None = ceil(timeout_s) + 1 per phase the process may run.
    memory_mb: RLIMIT_AS (virtual address space). file_size_mb: RLIMIT_FSIZE (also caps stdout/stderr).
    nproc: RLIMIT_NPROC (user-wide count; 0 forbids fork and threads; not enforced for root).
    max_open_files: RLIMIT_NOFILE. max_output_bytes: how much stdout/stderr is read back.
    """

    timeout_s: float = 5.0
    cpu_s: int | None = None
    memory_mb: int = 1024
    file_size_mb: int = 16
    nproc: int = 0
    max_open_files: int = 64
    max_output_bytes: int = 1 << 20

    def __post_init__(self):
        if not self.timeout_s > 0:
            raise ValueError(f"timeout_s must be > 0, got {self.timeout_s}")
        for name in ("memory_mb", "file_size_mb", "max_open_files", "max_output_bytes"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be > 0, got {getattr(self, name)}")
        if self.nproc < 0:
            raise ValueError(f"nproc must be >= 0, got {self.nproc}")

    def rlimits(self, phases: int = 1) -> list[tuple[str, int]]:
        cpu = self.cpu_s if self.cpu_s is not None else math.ceil(self.timeout_s) * phases + 1
        return [
            ("RLIMIT_CPU", int(cpu)),
            ("RLIMIT_AS", self.memory_mb << 20),
            ("RLIMIT_FSIZE", self.file_size_mb << 20),
            ("RLIMIT_NOFILE", self.max_open_files),
            ("RLIMIT_NPROC", self.nproc),
            ("RLIMIT_CORE", 0),
        ]


@dataclasses.dataclass(frozen=True)
class RunResult:
    """Outcome of one script run. returncode < 0: killed by signal -returncode (e.g. -11 = SIGSEGV)."""

    returncode: int | None
    stdout: str
    stderr: str
    timed_out: bool
    wall_s: float

    @property
    def ok(self) -> bool:
        return self.returncode == 0 and not self.timed_out


def _child_env(workdir: str) -> dict[str, str]:
    env = {"PATH": os.defpath, "LANG": "C.UTF-8", "LC_ALL": "C.UTF-8", "HOME": workdir, "TMPDIR": workdir}
    env.update({k: "1" for k in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS")})
    return env


def _kill_group(proc: subprocess.Popen) -> None:
    """SIGKILL the child's process group (it is its own session leader), then reap it."""
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    try:
        proc.wait(timeout=5.0)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def _read_capped(path: str, limit: int) -> str:
    try:
        with open(path, "rb") as f:
            return f.read(limit).decode("utf-8", errors="replace")
    except FileNotFoundError:
        return ""


def _spawn(cfg: dict, workdir: str, stdin: str | bytes) -> subprocess.Popen:
    """Start the bootstrap; `stdin` is a file path (script input) or bytes sent through a pipe (the nonce:
    a pipe, unlike a file, cannot be re-read by the candidate)."""
    with open(os.path.join(workdir, "stdout"), "wb") as out, open(os.path.join(workdir, "stderr"), "wb") as err:
        stdin_file = open(stdin, "rb") if isinstance(stdin, str) else subprocess.PIPE
        try:
            proc = subprocess.Popen(
                [sys.executable, "-I", "-c", _BOOTSTRAP, json.dumps(cfg)],
                stdin=stdin_file, stdout=out, stderr=err, cwd=workdir, env=_child_env(workdir),
                close_fds=True, start_new_session=True,
            )
        finally:
            if isinstance(stdin, str):
                stdin_file.close()
    if isinstance(stdin, bytes):
        try:
            proc.stdin.write(stdin)
            proc.stdin.close()
        except BrokenPipeError:
            pass
    return proc


def _workdir() -> tempfile.TemporaryDirectory:
    return tempfile.TemporaryDirectory(prefix="m1jax_sandbox_", ignore_cleanup_errors=True)


def run_script(source: str, *, stdin: str = "", limits: SandboxLimits = SandboxLimits()) -> RunResult:
    """Run `source` as `__main__` of a fresh sandboxed interpreter with `stdin`; wall clock `limits.timeout_s`."""
    with _workdir() as workdir:
        solution = os.path.join(workdir, "solution.py")
        stdin_path = os.path.join(workdir, "stdin")
        with open(solution, "w", encoding="utf-8") as f:
            f.write(source)
        with open(stdin_path, "w", encoding="utf-8") as f:
            f.write(stdin)
        cfg = {"mode": "script", "solution": solution, "rlimits": limits.rlimits()}
        start = time.monotonic()
        proc = _spawn(cfg, workdir, stdin_path)
        timed_out = False
        try:
            proc.wait(timeout=limits.timeout_s)
        except subprocess.TimeoutExpired:
            timed_out = True
        _kill_group(proc)
        wall = time.monotonic() - start
        return RunResult(
            returncode=None if timed_out else proc.returncode,
            stdout=_read_capped(os.path.join(workdir, "stdout"), limits.max_output_bytes),
            stderr=_read_capped(os.path.join(workdir, "stderr"), limits.max_output_bytes),
            timed_out=timed_out,
            wall_s=wall,
        )


def _read_progress(path: str, nonce: str) -> list[tuple[str, int]]:
    """Harness events ("R" setup done, "S" test started, "P"/"F" passed/failed); lines without the nonce are
    ignored (a candidate writing to the file would have to know it)."""
    events = []
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            for line in f:
                parts = line.split()
                if len(parts) == 3 and parts[2] == nonce and parts[0] in "RSPF" and len(parts[0]) == 1:
                    events.append((parts[0], int(parts[1])))
    except FileNotFoundError:
        pass
    return events


def run_assert_tests(
    source: str,
    tests: Sequence[str],
    *,
    limits: SandboxLimits = SandboxLimits(),
    poll_s: float = 0.01,
) -> list[bool]:
    """Pass/fail of each test snippet (e.g. "assert f(2) == 4") run after `source` in a shared namespace.

    One interpreter runs the module (`__name__ == "solution"`, so `if __name__ == "__main__":` blocks do not
    run) and then the tests in order, reporting progress to the parent. The parent gives the module setup and
    each test `limits.timeout_s` of wall clock. A test that hangs or crashes the interpreter (segfault,
    os._exit, sys.exit, memory exhaustion) fails; the remaining tests resume in a fresh interpreter. If the
    module itself fails (syntax error, exception, hang, crash) every remaining test fails.
    """
    tests = [str(t) for t in tests]
    results: list[bool | None] = [None] * len(tests)
    start = 0
    with _workdir() as workdir:
        solution = os.path.join(workdir, "solution.py")
        tests_path = os.path.join(workdir, "tests.json")
        with open(solution, "w", encoding="utf-8") as f:
            f.write(source)
        with open(tests_path, "w", encoding="utf-8") as f:
            json.dump(tests, f)
        while start < len(tests):
            nonce = secrets.token_hex(16)
            progress = os.path.join(workdir, f"progress_{start}")
            cfg = {
                "mode": "asserts", "solution": solution, "tests": tests_path, "progress": progress,
                "start": start, "rlimits": limits.rlimits(phases=len(tests) - start + 1),
            }
            proc = _spawn(cfg, workdir, (nonce + "\n").encode())
            phase_start, n_events = time.monotonic(), 0
            while True:
                try:
                    proc.wait(timeout=poll_s)
                    break
                except subprocess.TimeoutExpired:
                    pass
                events = _read_progress(progress, nonce)
                if len(events) != n_events:
                    n_events, phase_start = len(events), time.monotonic()
                elif time.monotonic() - phase_start > limits.timeout_s:
                    break
            _kill_group(proc)
            events = _read_progress(progress, nonce)
            for tag, i in events:
                if tag in "PF" and start <= i < len(tests):
                    results[i] = tag == "P"
            if not any(tag == "R" for tag, _ in events):
                break  # the module itself failed: nothing further can pass
            started = [i for tag, i in events if tag == "S"]
            if not started:
                break
            last = started[-1]
            if results[last] is None:
                results[last] = False  # hung or crashed inside this test
            start = last + 1
    return [bool(r) for r in results]
