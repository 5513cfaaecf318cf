"""One process of the multi-host test (`tests/test_multihost.py`): a tiny model built sharded over a global mesh,
its forward logits and a greedy `Engine.generate`, written to `OUT/<mesh>.npz` for every mesh asked for.

    python tests/multihost_worker.py --process-id I --num-processes N --port P --out DIR --mesh data=2,expert=4 ...

With N > 1 the process joins a `jax.distributed` job over gloo CPU collectives (its devices: XLA_FLAGS'
`--xla_force_host_platform_device_count`); `run()` is also what the one-process reference calls. `launch` starts
the processes of such a job (this worker, or `m1jax train ... --coordinator`) for the multi-host tests.
"""

from __future__ import annotations

import argparse
import faulthandler
import os
import pathlib
import socket
import subprocess
import sys
import time
from collections.abc import Callable

import numpy as np

SEED = 0
PROMPTS = ([5, 17, 99, 3, 42, 7, 250, 11, 64], [300, 2, 8], [1, 2, 3, 4, 5, 6], [77] * 13,
           [9, 8, 7, 6, 5], [400, 401], [12, 13, 14, 15, 16, 17, 18], [220])
MAX_NEW = 6


REPO = pathlib.Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(command: Callable[[int], list[str]], logs: pathlib.Path, *, num_processes: int = 2,
           local_devices: int = 4, timeout_s: float = 900, extra_env: dict | None = None) -> list[str]:
    """Run `command(i)` as process i of a CPU job (each with `local_devices` devices, the repo on PYTHONPATH),
    wait (hard timeout, then SIGKILL: jax's preemption notifier swallows SIGTERM), assert every process exited
    with 0; returns their logs (`logs/worker{i}.log`)."""
    env = dict(os.environ, XLA_FLAGS=f"--xla_force_host_platform_device_count={local_devices}", JAX_PLATFORMS="cpu",
               PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]), **(extra_env or {}))
    paths = [logs / f"worker{i}.log" for i in range(num_processes)]
    procs = []
    for i, path in enumerate(paths):
        with open(path, "wb") as f:
            procs.append(subprocess.Popen(command(i), env=env, stdout=f, stderr=subprocess.STDOUT, cwd=REPO))
    deadline = time.monotonic() + timeout_s
    try:
        for p in procs:
            p.wait(timeout=max(deadline - time.monotonic(), 1))
    except subprocess.TimeoutExpired:
        pass
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    texts = [path.read_text(errors="replace") for path in paths]
    for i, p in enumerate(procs):
        assert p.returncode == 0, f"process {i} exited with {p.returncode}:\n{texts[i][-4000:]}"
    return texts


def config():
    """The tiny preset in fp32 with 8 experts (so an 8-way expert axis has one per device)."""
    from m1jax.config import ModelConfig

    return ModelConfig.from_preset("tiny", dtype="float32", param_dtype="float32").replace(num_local_experts=8)


def parse_mesh(text: str) -> dict[str, int]:
    """"data=2,expert=4" → {"data": 2, "expert": 4}."""
    return {k: int(v) for k, v in (part.split("=") for part in text.split(","))}


def result_file(out, mesh_text: str, process_id: int) -> str:
    """Where process `process_id` writes the results of mesh `mesh_text`."""
    return os.path.join(out, f"{mesh_text.replace('=', '').replace(',', '_')}.p{process_id}.npz")


def run(mesh_shape: dict[str, int]) -> dict[str, np.ndarray]:
    """Logits of a fixed batch and greedy generations of `PROMPTS`, computed on `mesh_shape` over all devices of
    the job, as host arrays (the same on every process), and how many all-to-alls the forward program runs."""
    import jax
    from flax import nnx

    from m1jax.generation import Engine, to_host
    from m1jax.loading import init_sharded
    from m1jax.sampling import SamplingParams
    from m1jax.sharding import make_mesh, named_sharding

    cfg = config()
    mesh = make_mesh(mesh_shape)
    model = init_sharded(cfg, mesh, seed=SEED)
    print("model built", flush=True)
    tokens = np.random.default_rng(SEED).integers(0, cfg.vocab_size, (4, 24)).astype(np.int32)
    tokens = jax.device_put(tokens, named_sharding(("batch", None), tokens.shape, mesh))
    graphdef, params = nnx.split(model)
    with jax.set_mesh(mesh):
        forward = jax.jit(lambda p, t: nnx.merge(graphdef, p)(t).logits).lower(params, tokens).compile()
        logits = forward(params, tokens)
    print("logits", flush=True)
    engine = Engine(model, mesh=mesh, prefill_chunk=8)
    results = engine.generate([list(p) for p in PROMPTS], SamplingParams(temperature=0.0, max_new_tokens=MAX_NEW,
                                                                         stop_token_ids=()))
    return {"logits": to_host(logits).astype(np.float32),
            "tokens": np.array([r.tokens for r in results], np.int32),
            "logprobs": np.array([r.logprobs for r in results], np.float32),
            "all_to_all": np.array(forward.as_text().count(" all-to-all("))}  # expert parallelism's token exchange


def main(argv=None) -> int:
    faulthandler.enable()
    p = argparse.ArgumentParser()
    p.add_argument("--process-id", type=int, required=True)
    p.add_argument("--num-processes", type=int, required=True)
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--mesh", action="append", required=True)
    p.add_argument("--timeout", type=float, default=600, help="dump every thread's stack and exit after this")
    args = p.parse_args(argv)
    faulthandler.dump_traceback_later(args.timeout, exit=True)

    import jax

    jax.config.update("jax_default_matmul_precision", "highest")  # as tests/conftest.py
    if args.num_processes > 1:
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
        jax.distributed.initialize(f"127.0.0.1:{args.port}", num_processes=args.num_processes,
                                   process_id=args.process_id, initialization_timeout=60)
    print(f"process {jax.process_index()}/{jax.process_count()}: {jax.local_device_count()} local devices, "
          f"{jax.device_count()} global", flush=True)
    for text in args.mesh:
        result = run(parse_mesh(text))
        np.savez(result_file(args.out, text, args.process_id), **result)
        print(f"process {args.process_id}: mesh {text} done", flush=True)
    if args.num_processes > 1:
        jax.distributed.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
