"""Per-chip memory of the CISPO update step, full fine-tuning vs LoRA, under each remat policy (deviceless TPU).

Each row is one `m1jax plan --mode train --json` (a subprocess, so every compile starts with a fresh heap) of the
real M1 config's first `--layers` layers on `--topology` with the same mesh, tokens, micro-batches and log-prob
chunk; LoRA rows add `--lora-rank`. Columns: trained weights (fp32 masters: every weight, or the adapters), the
frozen base (LoRA), AdamW moments, the compiler's temporaries and code, the peak per chip, the compile's wall
seconds and the host RAM it used (the process's max RSS). A step the compiler refuses (RESOURCE_EXHAUSTED) is "no fit".

    PYTHONPATH=. .venv-tpu/bin/python benchmarks/train_memory.py --layers 2 --topology v5p-128 --batch 16 \\
        --context 8192 --mesh fsdp=2,expert=4,tensor=8 --micro-batches 8 --logprob-chunk 1024 --lora-rank 16
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def plan_row(args, remat: str, lora_rank: int) -> dict:
    """One compiled plan (the JSON of `m1jax plan`) plus the compile process's wall seconds and max RSS."""
    cmd = [sys.executable, "-m", "m1jax", "plan", "--model", args.model, "--topology", args.topology,
           "--mode", "train", "--batch", str(args.batch), "--context", str(args.context), "--mesh", args.mesh,
           "--layers", str(args.layers), "--scan", "on", "--remat", remat, "--micro-batches", str(args.micro_batches),
           "--lightning-impl", "xla", "--json"]
    if args.logprob_chunk:
        cmd += ["--logprob-chunk", str(args.logprob_chunk)]
    if lora_rank:
        cmd += ["--lora-rank", str(lora_rank)]
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        t0 = time.perf_counter()
        proc = subprocess.Popen(cmd, stdout=out, stderr=err, text=True, env=env, cwd=ROOT)
        _, status, usage = os.wait4(proc.pid, 0)  # this child's own rusage (max RSS)
        wall = time.perf_counter() - t0
        out.seek(0), err.seek(0)
        if os.waitstatus_to_exitcode(status) != 0:
            raise SystemExit(f"{' '.join(cmd)} failed:\n{err.read()[-3000:]}")
        p = json.loads(out.read())
    p["wall_s"] = wall
    p["max_rss_gb"] = usage.ru_maxrss * 1024 / 1e9
    return p


def row_text(p: dict) -> str:
    def gb(key):
        return "—" if p.get(key) is None or (key == "frozen_weights_gb_per_chip" and p["lora"] is None) else \
            f"{p[key]:.2f}"

    kind = "full" if p["lora"] is None else f"LoRA r{p['lora']['rank']}"
    peak = f"{p['peak_gb_per_chip']:.2f} ({'fits' if p['fits'] else 'no fit'})" if p["compiled"] else \
        "no fit (compiler: RESOURCE_EXHAUSTED)"
    return (f"| {kind} | {p['remat']} | {gb('master_weights_gb_per_chip')} | {gb('frozen_weights_gb_per_chip')} | "
            f"{gb('optimizer_state_gb_per_chip')} | {gb('temp_gb_per_chip')} | {gb('code_gb')} | "
            f"{peak} | {p['compile_s']:.0f} | {p['max_rss_gb']:.1f} |")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="minimax-m1-80k")
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--topology", default="v5p-128")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--context", type=int, default=8192)
    ap.add_argument("--mesh", default="fsdp=2,expert=4,tensor=8")
    ap.add_argument("--micro-batches", type=int, default=8)
    ap.add_argument("--logprob-chunk", type=int, default=1024)
    ap.add_argument("--lora-rank", type=int, default=16)
    ap.add_argument("--remat", nargs="+", default=["none", "full", "save_dots"])
    ap.add_argument("--kinds", nargs="+", choices=["full", "lora"], default=["full", "lora"])
    args = ap.parse_args()
    print(f"{args.model}, first {args.layers} layers (scanned), {args.topology}, mesh {args.mesh}, "
          f"{args.batch} × {args.context} tokens, {args.micro_batches} micro-batches, log-prob chunk "
          f"{args.logprob_chunk}; GB per chip")
    print("| update | remat | trained fp32 masters | frozen base | AdamW moments | temporaries | code | peak | "
          "compile s | host RAM GB |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for kind in args.kinds:
        for remat in args.remat:
            print(row_text(plan_row(args, remat, args.lora_rank if kind == "lora" else 0)), flush=True)


if __name__ == "__main__":
    main()
