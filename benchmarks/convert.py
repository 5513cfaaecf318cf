"""Weight conversion at scale: throughput and peak memory of the streaming `m1jax convert` (and `m1jax export`)
against the naive path (load every parameter into memory with `from_pretrained`, then `orbax` save).

A synthetic original-layout checkpoint (~4.3 GB bf16, router gates fp32) is generated with one kind of tensor
much larger than the rest (embedding and LM head, 1.07 GB each; every other tensor ≤ 100 MB). Each approach runs
in its own child process; its peak RSS is the kernel's `ru_maxrss` for that child (`os.wait4`), which counts
file-backed pages of memory maps too. The target for streaming is peak RSS < 1 GB + 2 × largest source tensor.
A last run converts the first ~10 GB of the real MiniMax-M1 checkpoint shapes (413 shards, 2.46 GB embedding,
113 MB expert matrices) from sparse files (holes read as zeros), stopped with the converter's kill hook.
Prints a markdown table.

    python benchmarks/convert.py [--workdir /tmp/m1jax-convert-bench] [--workers 2] [--small] [--keep]
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from m1jax.config import ModelConfig  # noqa: E402

GB = 1e9


def bench_config(small: bool) -> dict:
    """4 layers (3 lightning + 1 softmax), hidden 4096, 8 experts of 4096×2048, vocab 131072 (1/8 with --small)."""
    vocab, hidden, ffn = (131072, 4096, 2048) if not small else (16384, 1024, 512)
    heads = hidden // 128
    c = ModelConfig.from_preset("tiny").replace(
        vocab_size=vocab, hidden_size=hidden, num_attention_heads=heads, num_key_value_heads=max(1, heads // 4),
        head_dim=128, intermediate_size=ffn, num_local_experts=8, rotary_dim=64)
    return c.to_hf_dict()


CHILD = {
    "generate": """
import json, sys
from m1jax.convert.synthetic import write_checkpoint
write_checkpoint(sys.argv[1], json.loads(sys.argv[2]), shard_bytes=2 * 10**9)
""",
    "streaming convert": """
import sys
from m1jax.convert.hf_to_m1jax import convert_checkpoint
convert_checkpoint(sys.argv[1], sys.argv[2], workers=int(sys.argv[3]), progress=False)
""",
    "naive: load all + orbax save": """
import sys
import orbax.checkpoint as ocp
from flax import nnx
from m1jax.loading import from_pretrained
model = from_pretrained(sys.argv[1])
ckptr = ocp.StandardCheckpointer()
ckptr.save(sys.argv[2], nnx.state(model))
ckptr.wait_until_finished()
""",
    "streaming export": """
import sys
from m1jax.convert.m1jax_to_hf import export_checkpoint
export_checkpoint(sys.argv[1], sys.argv[2], progress=False)
""",
}


def run_child(kind: str, *args: str, env: dict | None = None, killed_ok: bool = False) -> tuple[float, float]:
    """(wall seconds, peak RSS bytes) of one approach run alone in a child process."""
    env = {**os.environ, "PYTHONPATH": REPO, "JAX_PLATFORMS": "cpu", **(env or {})}
    env.pop("XLA_FLAGS", None)
    t0 = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-c", CHILD[kind], *args], cwd=REPO, env=env)
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - t0
    code = os.waitstatus_to_exitcode(status)
    if code != 0 and not (killed_ok and code == -9):
        raise SystemExit(f"{kind} failed with exit code {code}")
    return wall, usage.ru_maxrss * 1024  # Linux reports KiB


def write_sparse_m1(path: str, fixtures: str) -> int:
    """The real MiniMax-M1 checkpoint (413 shards, 912 GB, real shapes and dtypes) as sparse files: valid headers,
    data left as holes that read as zeros and take no disk. Returns the tensor bytes."""
    import json
    import struct

    from m1jax.convert.hf_layout import ORIGINAL, expected_tensors

    config = json.load(open(os.path.join(fixtures, "config.json")))
    index = json.load(open(os.path.join(fixtures, "model.safetensors.index.json")))
    shapes = expected_tensors(ModelConfig.from_hf_dict(config), ORIGINAL)
    os.makedirs(path)
    shards: dict[str, list[str]] = {}
    for name, shard in index["weight_map"].items():
        shards.setdefault(shard, []).append(name)
    total = 0
    for shard, names in shards.items():
        header, offset = {}, 0
        for name in names:
            dtype, size = ("F32", 4) if name.endswith("block_sparse_moe.gate.weight") else ("BF16", 2)
            for s in shapes[name]:
                size *= s
            header[name] = {"dtype": dtype, "shape": list(shapes[name]), "data_offsets": [offset, offset + size]}
            offset += size
        blob = json.dumps(header).encode()
        blob += b" " * (-len(blob) % 8)
        with open(os.path.join(path, shard), "wb") as f:
            f.write(struct.pack("<Q", len(blob)) + blob)
            f.truncate(8 + len(blob) + offset)
        total += offset
    assert total == index["metadata"]["total_size"], "shapes/dtypes disagree with the real index"
    json.dump(index, open(os.path.join(path, "model.safetensors.index.json"), "w"))
    json.dump(config, open(os.path.join(path, "config.json"), "w"))
    return total


def m1_shapes_run(workdir: str, fixtures: str, commits: int, workers: int) -> list | None:
    """Streaming convert of the sparse real-shape M1 checkpoint, killed after `commits` commits."""
    import json

    if not os.path.isdir(fixtures):
        print(f"(skipping the real-shape run: no fixtures at {fixtures})")
        return None
    from m1jax.convert.hf_checkpoint import HFCheckpoint
    from m1jax.convert.hf_to_m1jax import BLOCK_BYTES, plan

    src, dst = os.path.join(workdir, "m1-sparse"), os.path.join(workdir, "m1-out")
    write_sparse_m1(src, fixtures)
    ckpt = HFCheckpoint(src)
    _, blocks = plan(ckpt, ckpt.validate(), "bfloat16", BLOCK_BYTES)
    size = {b.id: b.nbytes for b in blocks}
    largest = max(ckpt.info(n).nbytes for n in ckpt.weight_map)
    wall, rss = run_child("streaming convert", src, dst, str(workers), env={"M1JAX_CONVERT_KILL_AFTER": str(commits)},
                          killed_ok=True)
    done = set()
    with open(os.path.join(dst, ".m1jax-convert-journal.jsonl")) as f:
        for line in f.read().splitlines()[1:]:
            done.update(json.loads(line)["done"])
    nbytes = sum(size[i] for i in done)
    shutil.rmtree(dst)
    shutil.rmtree(src)
    print(f"real M1 shapes: {nbytes / GB:.2f} GB of {len(done)} blocks in {wall:.1f} s, peak RSS {rss / GB:.2f} GB",
          flush=True)
    return [f"streaming convert, real M1 shapes (first {nbytes / GB:.1f} of 912 GB, sparse source)", f"{wall:.1f}",
            f"{nbytes / wall / GB:.3f}", f"{rss / GB:.2f}", f"{rss / largest:.2f}",
            "yes" if rss < 1 * GB + 2 * largest else "no", f"{nbytes / GB:.2f}"]


def largest_tensor(src: str) -> tuple[str, int, int]:
    from m1jax.convert.hf_checkpoint import HFCheckpoint

    ckpt = HFCheckpoint(src)
    infos = [ckpt.info(n) for n in ckpt.weight_map]
    big = max(infos, key=lambda i: i.nbytes)
    return big.name, big.nbytes, sum(i.nbytes for i in infos)


def disk_write_rate(directory: str, nbytes: int = 2 * 10**9) -> float:
    """Bytes/s of writing `nbytes` to a new file in `directory` and fsync'ing it (the disk's ceiling here)."""
    block = os.urandom(64 * 2**20)
    path = os.path.join(directory, "disk-probe")
    t0 = time.perf_counter()
    with open(path, "wb") as f:
        for _ in range(nbytes // len(block)):
            f.write(block)
        f.flush()
        os.fsync(f.fileno())
    rate = nbytes // len(block) * len(block) / (time.perf_counter() - t0)
    os.remove(path)
    return rate


def dir_bytes(path: str) -> int:
    return sum(os.path.getsize(os.path.join(d, f)) for d, _, files in os.walk(path) for f in files)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workdir", default="/tmp/m1jax-convert-bench")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--small", action="store_true", help="a 1/8-width smoke run (~80 MB)")
    ap.add_argument("--keep", action="store_true", help="keep the generated files")
    ap.add_argument("--m1-commits", type=int, default=160,
                    help="commits of the real-shape MiniMax-M1 run (0: skip it)")
    ap.add_argument("--fixtures", default=os.path.join(os.path.dirname(REPO), "shared", "fixtures", "minimax-m1"))
    args = ap.parse_args()

    import json

    if os.path.exists(args.workdir):
        shutil.rmtree(args.workdir)
    os.makedirs(args.workdir)
    free = shutil.disk_usage(args.workdir).free
    need = (16 if not args.small else 1) * GB
    if free < need:
        raise SystemExit(f"need ~{need / GB:.0f} GB free in {args.workdir}, have {free / GB:.1f} GB")
    src, out, naive, back = (os.path.join(args.workdir, n) for n in ("hf", "m1jax", "naive-orbax", "hf-back"))
    try:
        gen_s, _ = run_child("generate", src, json.dumps(bench_config(args.small)))
        name, big, total = largest_tensor(src)
        shards = sum(f.endswith(".safetensors") for f in os.listdir(src))
        print(f"source: {total / GB:.2f} GB in {shards} shards (generated in {gen_s:.0f} s); "
              f"largest tensor {name} {big / GB:.2f} GB; target peak RSS < 1 GB + 2 × largest = "
              f"{(1 * GB + 2 * big) / GB:.2f} GB", flush=True)
        disk = disk_write_rate(args.workdir)
        print(f"disk: sequential write + fsync {disk / GB:.3f} GB/s", flush=True)
        rows = []
        for kind, a, b, extra in (("streaming convert", src, out, [str(args.workers)]),
                                  ("naive: load all + orbax save", src, naive, []),
                                  ("streaming export", out, back, [])):
            wall, rss = run_child(kind, a, b, *extra)
            rows.append([kind, f"{wall:.1f}", f"{total / wall / GB:.3f}", f"{rss / GB:.2f}", f"{rss / big:.2f}",
                         "yes" if rss < 1 * GB + 2 * big else "no", f"{dir_bytes(b) / GB:.2f}"])
            print(f"{kind}: {wall:.1f} s, peak RSS {rss / GB:.2f} GB", flush=True)
            if kind == "naive: load all + orbax save":
                shutil.rmtree(naive)  # free the disk before the export
        if args.m1_commits:
            row = m1_shapes_run(args.workdir, args.fixtures, args.m1_commits, args.workers)
            if row:
                rows.append(row)
        from benchmarks.common import table

        print()
        print(f"Weight conversion, {total / GB:.2f} GB bf16 checkpoint (largest tensor {big / GB:.2f} GB), "
              f"workers={args.workers}, {os.cpu_count()} CPU cores, disk write+fsync {disk / GB:.3f} GB/s "
              f"(measured just before)")
        print(table(["approach", "wall s", "GB/s", "peak RSS GB", "RSS / largest tensor",
                     "< 1 GB + 2×largest", "output GB"], rows))
    finally:
        if not args.keep:
            shutil.rmtree(args.workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
