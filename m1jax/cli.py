"""The `m1jax` command line: one entry point, one subcommand per job."""

from __future__ import annotations

import argparse
import sys
import time

from m1jax.config import QUANTIZE_MODES
from m1jax.errors import UserError, user_errors


def cmd_demo(args) -> int:
    """Build a model from a preset with random weights, run it on a few tokens, print logits and expert load."""
    import jax
    import jax.numpy as jnp
    import numpy as np
    from flax import nnx

    from m1jax.config import ModelConfig
    from m1jax.model import MiniMaxM1

    config = ModelConfig.from_preset(args.preset)
    model = MiniMaxM1(config, rngs=nnx.Rngs(args.seed))
    tokens = jnp.asarray(np.random.default_rng(args.seed).integers(0, config.vocab_size, (args.batch, args.seq)))
    out = nnx.jit(lambda m, t: m(t, return_routing=True))(model, tokens)
    print(f"model {args.preset}: {config.param_counts()['total']:,} parameters, layers "
          f"{''.join('L' if t == 'linear_attention' else 'S' for t in config.layer_types)} "
          f"(L = lightning, S = softmax), backend {jax.default_backend()}")
    print(f"logits shape {tuple(out.logits.shape)} dtype {out.logits.dtype}")
    print("per-layer expert load (share of routed tokens per expert):")
    for i, stats in enumerate(out.routing):
        load = np.asarray(stats["tokens_per_expert"]) / float(np.sum(stats["tokens_per_expert"]))
        print(f"  layer {i} [{config.layer_types[i][:6]}] " + " ".join(f"{x:5.3f}" for x in load)
              + f"   aux loss {float(stats['aux_loss']):.3f}")
    return 0


def _load_model_and_tokenizer(args):
    """--model DIR (HF or converted checkpoint with tokenizer files), --preset NAME (random weights), or the
    embedded default (`m1jax.demo.load_default_model`: the trained demo model)."""
    from m1jax.demo import demo_model, demo_tokenizer, load_default_model
    from m1jax.tokenizer import Tokenizer

    if args.model is None and args.preset is None:
        if args.tokenizer is not None:
            raise UserError("--tokenizer needs --model or --preset (the embedded demo model has its own tokenizer)")
        return load_default_model(dtype=args.dtype, quantize=args.quantize)
    if args.model is None:
        model = demo_model(args.preset, seed=args.model_seed, dtype=args.dtype or "float32", quantize=args.quantize)
        tokenizer = demo_tokenizer(model.config.vocab_size) if args.tokenizer is None else \
            Tokenizer.from_pretrained(args.tokenizer)
        return model, tokenizer
    from m1jax.loading import from_pretrained

    model = from_pretrained(args.model, dtype=args.dtype, quantize=args.quantize)
    try:
        tokenizer = Tokenizer.from_pretrained(args.tokenizer or args.model)
    except (FileNotFoundError, ValueError) as e:
        raise UserError(f"no usable tokenizer in {args.tokenizer or args.model} ({e}); pass --tokenizer DIR") from None
    return model, tokenizer


DEFAULT_PROMPT = "The lightning attention of MiniMax"


def cmd_generate(args) -> int:
    """Generate from a text prompt or a chat conversation, streaming the text to stdout."""
    import json

    from m1jax.chat import parse_output
    from m1jax.generation import Engine
    from m1jax.sampling import SamplingParams

    if args.input_file is not None and (args.messages or args.chat or args.prompt is not None):
        raise UserError("--input-file is the whole prompt; it cannot be combined with --prompt, --chat or --messages")
    if args.input_file is None and (args.checkpoint_dir is not None or args.context_window is not None):
        raise UserError("--checkpoint-dir and --context-window go with --input-file")
    if args.checkpoint_every is not None and args.checkpoint_dir is None:
        raise UserError("--checkpoint-every needs --checkpoint-dir")
    model, tokenizer = _load_model_and_tokenizer(args)
    try:
        sampling = SamplingParams(temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
                                  min_p=args.min_p, seed=args.seed, max_new_tokens=args.max_new_tokens,
                                  stop_strings=tuple(args.stop or ()),
                                  repetition_stop=args.repetition_stop or None)
    except ValueError as e:
        raise UserError(str(e)) from None
    engine = Engine(model, tokenizer, prefill_chunk=args.prefill_chunk)
    prompt = DEFAULT_PROMPT if args.prompt is None else args.prompt
    if args.messages:
        try:
            messages = json.loads(open(args.messages, encoding="utf-8").read())
        except (OSError, json.JSONDecodeError) as e:
            raise UserError(f"cannot read --messages {args.messages}: {e}") from None
    elif args.chat:
        messages = ([{"role": "system", "content": args.system}] if args.system else []) + \
            [{"role": "user", "content": prompt}]
    else:
        messages = None
    if messages is not None:
        if tokenizer.chat_template is None:
            raise UserError("the tokenizer has no chat_template; use --prompt without --chat")
        text = tokenizer.apply_chat_template(messages, add_generation_prompt=True)
    elif args.input_file is None:
        text = prompt
    stream = tokenizer.stream_decoder()

    def on_step(step, tokens, active):
        if args.stream and active[0]:
            sys.stdout.write(stream.push(int(tokens[0])))
            sys.stdout.flush()

    callback = on_step if args.stream else None
    resumed = ""
    if args.input_file is None:
        ids = tokenizer.encode(text)
        n_prompt = len(ids)
        [result] = engine.generate([ids], sampling, callback=callback, thinking_budget=args.thinking_budget)
    else:
        import time

        from m1jax.streaming import prefill_file

        shown = [time.perf_counter(), False]

        def progress(n):  # on a terminal: the tokens prefilled, every few seconds
            if sys.stderr.isatty() and time.perf_counter() - shown[0] > 5:
                shown[:] = time.perf_counter(), True
                print(f"\r[prefilled {n} tokens]", end="", file=sys.stderr, flush=True)

        streamed = prefill_file(engine, args.input_file, checkpoint_dir=args.checkpoint_dir,
                                checkpoint_every=args.checkpoint_every, context_window=args.context_window,
                                reserve=args.max_new_tokens, progress=progress)
        if shown[1]:
            print(file=sys.stderr)
        n_prompt = streamed.tokens
        resumed = (f" (resumed from the checkpoint at token {streamed.resumed_from})" if streamed.resumed_from
                   else "")
        [result], _ = engine.decode(streamed.state, sampling, callback=callback, prompt_tokens=[n_prompt],
                                    consume_state=True, thinking_budget=args.thinking_budget)
    if args.stream:
        sys.stdout.write(stream.flush() + "\n")
    else:
        print(result.text)
    summary = (f"[{n_prompt} prompt tokens{resumed}, {len(result.tokens)} generated, finish reason: "
               f"{result.finish_reason}]")
    if result.reasoning_tokens:
        summary += f" [{result.reasoning_tokens} reasoning tokens]"
    if messages is not None:
        parsed = parse_output(result.text or "")
        summary += f" [reasoning: {len(parsed.reasoning or '')} chars, tool calls: {len(parsed.tool_calls)}]"
    print(summary, file=sys.stderr)
    return 0


def _serving_setup(args, *, local_devices: bool = False):
    """(scheduler, tokenizer, model, model name, request defaults) for `serve` / `batch` from their flags."""
    import pathlib

    from m1jax.generation import Engine
    from m1jax.plan import PlanError, parse_mesh
    from m1jax.serving import Scheduler
    from m1jax.serving.openai_protocol import Defaults

    for flag in ("slots", "context_window", "prefill_chunk", "decode_steps", "max_tokens"):
        if getattr(args, flag) < 1:
            raise UserError(f"--{flag.replace('_', '-')} must be ≥ 1, got {getattr(args, flag)}")
    if not args.temperature >= 0:
        raise UserError(f"--temperature must be ≥ 0, got {args.temperature}")
    if args.checkpoint_every is not None and args.state_dir is None:
        raise UserError("--checkpoint-every needs --state-dir")
    if not args.state_max_gb >= 0:
        raise UserError(f"--state-max-gb must be ≥ 0, got {args.state_max_gb}")
    defaults = Defaults(temperature=args.temperature, max_tokens=args.max_tokens)
    mesh = None
    if args.mesh:
        import jax

        from m1jax.sharding import make_mesh

        try:
            mesh = make_mesh(parse_mesh(args.mesh), devices=jax.local_devices() if local_devices else None)
        except (PlanError, ValueError) as e:
            raise UserError(f"--mesh {args.mesh}: {e}") from None
    model, tokenizer = _load_model_and_tokenizer(args)
    engine = Engine(model, tokenizer, mesh=mesh)
    scheduler = Scheduler(engine, slots=args.slots, context_window=args.context_window,
                          prefill_chunk=args.prefill_chunk, decode_steps=args.decode_steps,
                          prefix_cache_tokens=args.prefix_cache_tokens, state_dir=args.state_dir,
                          checkpoint_every=args.checkpoint_every, state_max_bytes=int(args.state_max_gb * 2**30))
    if args.warmup:
        t = time.perf_counter()
        scheduler.warmup()
        print(f"m1jax: compiled the decode bursts and prefill chunks in {time.perf_counter() - t:.1f} s",
              file=sys.stderr)
    name = args.served_model_name or (pathlib.Path(args.model).name if args.model else
                                      f"m1jax-{args.preset}" if args.preset else "m1jax-demo")
    return scheduler, tokenizer, model, name, defaults


def cmd_serve(args) -> int:
    """Serve the model over HTTP (`m1jax.serving.server`) until interrupted."""
    import uvicorn

    from m1jax.serving.server import create_app

    scheduler, tokenizer, _, name, defaults = _serving_setup(args)
    app = create_app(scheduler, tokenizer, name, context_window=args.context_window, defaults=defaults)
    scheduler.start()
    store = scheduler.state_store
    state = "" if store is None else (f", state dir {store.directory}: {len(store)} checkpoints, checkpoint every "
                                      f"{scheduler.checkpoint_every} tokens")
    print(f"m1jax serve: {name} on http://{args.host}:{args.port} ({args.slots} slots, context window "
          f"{args.context_window}{state})", file=sys.stderr)
    try:
        uvicorn.run(app, host=args.host, port=args.port, log_level="info")
    finally:
        scheduler.shutdown()
    return 0


def cmd_batch(args) -> int:
    """Run (or resume) a batch job (`m1jax.serving.batch`) and print its summary."""
    import jax

    from m1jax.serving.batch import model_fingerprint, run_batch

    replicas = args.replicas if args.replicas is not None else jax.process_count()
    replica = args.replica if args.replica is not None else (jax.process_index() if args.replicas is None else 0)
    if replicas < 1 or not 0 <= replica < replicas:
        raise UserError(f"--replica {replica} must be in [0, --replicas {replicas})")
    scheduler, tokenizer, model, name, defaults = _serving_setup(args, local_devices=replicas > 1)
    summary = run_batch(args.input, args.output_dir, scheduler, tokenizer, model_name=name,
                        model_fingerprint=model_fingerprint(model), context_window=args.context_window,
                        defaults=defaults, replica=replica, replicas=replicas, progress=args.progress)
    print(f"m1jax batch: {summary}", file=sys.stderr)
    return 0


def cmd_plan(args) -> int:
    """Per-chip memory, collectives and a step-time estimate of a model on a named topology (`m1jax.plan`)."""
    import json

    from m1jax.plan import PlanError, PlanRequest, ensure_tpu_compiler, format_plan, parse_mesh, plan
    from m1jax.topology import parse_topology

    try:
        topo = parse_topology(args.topology)
        req = PlanRequest(model=args.model, topology=args.topology, mode=args.mode, batch=args.batch,
                          context=args.context, mesh=parse_mesh(args.mesh), quantize=args.quantize,
                          layers=args.layers, chunk=args.chunk, lightning_impl=args.lightning_impl,
                          moe_impl=args.moe_impl, scan=args.scan, remat=args.remat,
                          micro_batches=args.micro_batches, logprob_chunk=args.logprob_chunk,
                          lora_rank=args.lora_rank, lora_alpha=args.lora_alpha,
                          lora_targets=None if args.lora_targets is None else tuple(
                              t.strip() for t in args.lora_targets.split(",")),
                          compile=not args.no_compile, top=args.top)
        if req.compile and topo.tpu_topology is not None:
            ensure_tpu_compiler(sys.argv[1:] if args.argv is None else args.argv)
        result = plan(req)
    except (PlanError, ValueError) as e:
        raise UserError(str(e)) from None
    print(json.dumps(result, indent=1) if args.json else format_plan(result))
    return 0


def _add_model_args(p) -> None:
    """The flags `_load_model_and_tokenizer` reads (generate, serve, batch)."""
    p.add_argument("--model", help="HF checkpoint dir or converted m1jax checkpoint (default: the embedded trained "
                   "demo model, m1jax/demo_model)")
    p.add_argument("--tokenizer", help="tokenizer dir (default: the model dir)")
    p.add_argument("--preset", help="a preset with random weights instead of the trained demo model (e.g. tiny)")
    p.add_argument("--model-seed", type=int, default=0, help="weight seed of --preset")
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--quantize", choices=[m for m in QUANTIZE_MODES if m],
                   help="int8 routed experts (quantized while loading; a checkpoint converted with --quantize "
                        "loads int8 without it)")


def _add_scheduler_args(p) -> None:
    """The flags of the continuous-batching scheduler and the request defaults (serve, batch)."""
    p.add_argument("--mesh", help="device mesh, e.g. data=2,tensor=4 (default: one device)")
    p.add_argument("--slots", type=int, default=8, help="concurrent sequences (decode batch)")
    p.add_argument("--context-window", type=int, default=4096, help="most tokens per sequence (prompt + output)")
    p.add_argument("--prefill-chunk", type=int, default=256, help="prompt tokens prefilled per scheduler step")
    p.add_argument("--decode-steps", type=int, default=4, help="decode steps per scheduler step")
    p.add_argument("--warmup", action="store_true", help="compile every decode burst and prefill chunk before "
                   "taking requests (a longer start; no request waits on a compile)")
    p.add_argument("--prefix-cache-tokens", type=int, default=0, help="prefix-cache capacity in tokens (0: off)")
    p.add_argument("--state-dir", help="checkpoint long prefills here and restore from them: a request retried "
                   "after a kill resumes its prefill, and long prefixes stay cached across restarts")
    p.add_argument("--checkpoint-every", type=int, help="with --state-dir: prompt tokens between checkpoints, a "
                   "multiple of --prefill-chunk (default: about 65536)")
    p.add_argument("--state-max-gb", type=float, default=20.0, help="disk budget of --state-dir in GiB (least "
                   "recently used checkpoints deleted first)")
    p.add_argument("--served-model-name", help="the model name in the API (default: the --model dir's name, "
                   "m1jax-PRESET or m1jax-demo)")
    p.add_argument("--temperature", type=float, default=1.0, help="default temperature of requests that give none")
    p.add_argument("--max-tokens", type=int, default=1024, help="default max_tokens of chat requests that give none")


def cmd_verify(args) -> int:
    """Check a checkpoint for silently wrong output (`m1jax.verify`); exit 1 when a check fails."""
    import json

    from m1jax.verify import verify

    if args.model is None:
        from m1jax.demo import load_default_model

        model, name = load_default_model(dtype="float32")[0], "the embedded default model"
    else:
        from m1jax.loading import from_pretrained

        model, name = from_pretrained(args.model, dtype="float32"), args.model
    try:
        report = verify(model, name=name, reference=args.reference, seq_len=args.seq_len, batch=args.batch,
                        seed=args.seed)
    except ValueError as e:
        raise UserError(str(e)) from None
    print(json.dumps(report.to_json(), indent=1) if args.json else report.format())
    return 0 if report.ok else 1


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="m1jax", description="MiniMax-M1 in JAX")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("demo", help="run a preset model with random weights (logits shape, expert load)")
    p.add_argument("--preset", default="tiny")
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--seq", type=int, default=32)
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser("generate", help="generate text (streams to stdout); without --model: the trained demo model")
    _add_model_args(p)
    p.add_argument("--prompt", help=f"prompt text (user message with --chat; default {DEFAULT_PROMPT!r})")
    p.add_argument("--input-file", help="UTF-8 text file as the whole prompt, tokenized in blocks and prefilled "
                   "chunk by chunk (documents of any length)")
    p.add_argument("--checkpoint-dir", help="with --input-file: save the prefill state here every "
                   "--checkpoint-every tokens and resume from it when rerun (refused for a changed file or model)")
    p.add_argument("--checkpoint-every", type=int, help="tokens between checkpoints, a multiple of --prefill-chunk "
                   "(default: the multiple nearest below 65536)")
    p.add_argument("--context-window", type=int, help="with --input-file: cache slots allocated up front (the "
                   "input plus --max-new-tokens must fit); default: the cache grows as needed")
    p.add_argument("--chat", action="store_true", help="render --prompt as a user turn with the chat template")
    p.add_argument("--system", help="system prompt (with --chat)")
    p.add_argument("--messages", help="JSON file with a chat conversation (list of {role, content})")
    p.add_argument("--max-new-tokens", type=int, default=256)
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--top-p", type=float, default=0.95)
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--min-p", type=float, default=0.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--stop", action="append", help="stop string (repeatable)")
    p.add_argument("--repetition-stop", type=int, default=3000, help="stop after N tokens each with p > 0.99 (0: off)")
    p.add_argument("--prefill-chunk", type=int, default=4096)
    p.add_argument("--thinking-budget", type=int, help="tokens of reasoning before `</think>` is forced (default: "
                   "the config's thinking_budget, if any)")
    p.add_argument("--no-stream", dest="stream", action="store_false")
    p.set_defaults(func=cmd_generate)

    p = sub.add_parser("serve", help="HTTP server: OpenAI-compatible chat/completions and POST "
                       "/v1/minimax-m1/generate over the continuous-batching scheduler")
    _add_model_args(p)
    _add_scheduler_args(p)
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.set_defaults(func=cmd_serve)

    p = sub.add_parser("batch", help="run an OpenAI Batch API file (resumable after a kill: rerun the same command)")
    p.add_argument("input", help="input .jsonl: {custom_id, method, url, body} per line")
    p.add_argument("output_dir", help="output.jsonl, errors.jsonl, manifest.json and the journal go here")
    _add_model_args(p)
    _add_scheduler_args(p)
    p.add_argument("--replicas", type=int, help="data-parallel replicas sharing the input (default: the number of "
                   "JAX processes)")
    p.add_argument("--replica", type=int, help="this replica's index (default: the JAX process index)")
    p.add_argument("--no-progress", dest="progress", action="store_false")
    p.set_defaults(func=cmd_batch)

    p = sub.add_parser("plan", help="per-chip memory, collectives and step-time estimate on a TPU slice (compiled "
                       "deviceless) or GPU host (arithmetic)")
    p.add_argument("--model", default="minimax-m1-80k", help="preset name or config.json path")
    p.add_argument("--topology", required=True, help="v5p-8 … v5p-1024, v5e-1 … v5e-256, v6e-…, 8xh100, 8xh200")
    p.add_argument("--mode", choices=["decode", "prefill", "train"], default="decode")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--context", type=int, default=32768, help="cache slots (decode) / tokens (prefill, train)")
    p.add_argument("--mesh", help="e.g. data=8,tensor=4,expert=2 (default: the best candidate by arithmetic)")
    p.add_argument("--quantize", choices=["int8-experts"])
    p.add_argument("--layers", type=int, help="only the first N layers (quick checks)")
    p.add_argument("--chunk", type=int, help="prefill: tokens per step (default: the whole context)")
    p.add_argument("--lightning-impl", choices=["auto", "xla", "pallas"], default="auto")
    p.add_argument("--moe-impl", choices=["auto", "ragged", "tiled", "gather", "switch", "dense"], default="auto")
    p.add_argument("--scan", choices=["auto", "on", "off"], help="layers as one scan over groups (default: the "
                   "config's)")
    p.add_argument("--remat", help="rematerialisation policy per scanned group (train), e.g. full")
    p.add_argument("--micro-batches", type=int, default=1, help="train: gradient accumulation steps per update")
    p.add_argument("--logprob-chunk", type=int, help="train: positions per chunk of the fp32 head's log-probs")
    p.add_argument("--lora-rank", type=int, default=0, help="LoRA adapters of this rank (train: only they are "
                   "trained, the base is frozen with no master copy or optimizer state)")
    p.add_argument("--lora-alpha", type=float, help="LoRA scale α (default: 2 · rank)")
    p.add_argument("--lora-targets", help="LoRA targets, comma-separated: attention,experts (the default)")
    p.add_argument("--no-compile", action="store_true", help="shape arithmetic only (no libtpu needed)")
    p.add_argument("--top", type=int, default=0, help="list the compiled step's N costliest operations by HBM "
                   "bytes and by FLOPs (loop bodies × trip counts)")
    p.add_argument("--json", action="store_true", help="print the plan as JSON")
    p.set_defaults(func=cmd_plan, argv=None)
    p = sub.add_parser("verify", help="check a checkpoint for silently wrong output (self-consistency checks, "
                       "optionally against transformers); exit code 1 on a failed check")
    p.add_argument("--model", help="HF checkpoint dir or converted m1jax checkpoint (default: embedded demo)")
    p.add_argument("--reference", choices=["transformers"], help="also compare every layer with transformers' "
                   "MiniMaxForCausalLM (CPU fp32; needs torch and transformers)")
    p.add_argument("--seq-len", type=int, help="probe tokens per sequence (default: 3 chunks of 1.5 lightning "
                   "blocks + 1)")
    p.add_argument("--batch", type=int, default=2, help="probe sequences")
    p.add_argument("--seed", type=int, default=0, help="probe token seed")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p.set_defaults(func=cmd_verify)
    from m1jax.convert.cli import add_subcommands
    add_subcommands(sub)
    from m1jax.train.cli import add_subcommands as add_train_subcommands
    add_train_subcommands(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if argv is not None:
        args.argv = list(argv)
    try:
        return args.func(args)
    except user_errors() as e:
        print(f"m1jax {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
