"""``onnxshard generate``: generate from a decoder plan on Ray, prompts as text (through the model folder's
tokenizer) or token ids; several prompts run at once through the same stages (continuous batching)."""

from __future__ import annotations

import json
import sys
from pathlib import Path


def add_parser(sub, *, positive_int, positive_float, non_negative_float) -> None:
    p = sub.add_parser("generate", help="generate text or tokens from a decoder plan (its KV cache kept per stage)")
    p.add_argument("plan", help="a plan folder of a decoder exported with past_key_values/present")
    p.add_argument("--prompt", action="append", default=[], help="a text prompt (repeatable; needs tokenizer.json "
                   "beside the model or in the plan folder)")
    p.add_argument("--ids", action="append", default=[], metavar="1,2,3", help="a prompt as token ids (repeatable)")
    p.add_argument("--max-tokens", type=positive_int, default=16, help="tokens to generate at most (default 16)")
    p.add_argument("--temperature", type=non_negative_float, default=0.0, help="0 (default): greedy")
    p.add_argument("--top-k", type=int, default=0, help="sample among the k most likely (0: all)")
    p.add_argument("--top-p", type=positive_float, default=1.0, help="sample among the fewest reaching p")
    p.add_argument("--seed", type=int, help="makes sampling reproducible")
    p.add_argument("--stop", action="append", default=[], help="end the text before this string (repeatable)")
    p.add_argument("--kv-cache-memory", metavar="SIZE", help="KV cache each stage worker may hold, e.g. 2GB "
                   "(sequences that would not fit wait)")
    p.add_argument("--max-model-len", type=positive_int, help="the longest sequence the model takes")
    p.add_argument("--cpus-per-stage", type=positive_float, default=1.0, help="CPUs per stage worker")
    p.add_argument("--gpus-per-stage", type=non_negative_float, default=0.0, help="GPUs per stage worker")
    p.add_argument("--json", action="store_true", help="print one JSON object per prompt (text, token ids, "
                   "finish reason) instead of the text")
    p.add_argument("--address", help="Ray address (default: $RAY_ADDRESS, else a local Ray)")
    p.set_defaults(handler=run)


def run(args) -> int:
    from onnxshard.distributed.generator import Generator
    from onnxshard.errors import InputError
    from onnxshard.plans import Plan
    from onnxshard.sampling import SamplingParams
    from onnxshard.text import TextCodec, TextStream
    from onnxshard.units import parse_bytes

    if not args.prompt and not args.ids:
        raise InputError("give a prompt: --prompt TEXT or --ids 1,2,3")
    plan = Plan.load(args.plan)
    codec = TextCodec.find(plan.root, Path(plan.model).parent)
    if args.prompt and codec is None:
        raise InputError(f"--prompt needs a tokenizer.json beside the model ({Path(plan.model).parent}) or in the "
                         "plan folder; give token ids with --ids instead")
    prompts = [codec.encode(text) for text in args.prompt] + [_ids(text) for text in args.ids]
    params = SamplingParams(max_tokens=args.max_tokens, temperature=args.temperature, top_k=args.top_k,
                            top_p=args.top_p, seed=args.seed,
                            eos_token_id=codec.eos_token_id if codec is not None else None)
    memory = parse_bytes(args.kv_cache_memory) if args.kv_cache_memory else None
    with Generator(plan, kv_cache_memory=memory, max_model_len=args.max_model_len, cpus_per_stage=args.cpus_per_stage,
                   gpus_per_stage=args.gpus_per_stage, address=args.address) as gen:
        seqs = [gen.submit(p, params) for p in prompts]
        for i, seq in enumerate(seqs):
            stream = TextStream(codec, args.stop) if codec is not None else None
            pieces = []
            for token in seq.stream():
                piece = stream.push(token) if stream is not None else f"{token} "
                pieces.append(piece)
                if not args.json:
                    sys.stdout.write(piece)
                    sys.stdout.flush()
                if stream is not None and stream.stopped:
                    gen.abort(seq)
                    break
            rest = stream.flush() if stream is not None else ""
            reason = "stop" if stream is not None and stream.stopped else seq.finish_reason
            if args.json:
                print(json.dumps({"index": i, "text": "".join(pieces) + rest if stream is not None else None,
                                  "token_ids": list(seq.tokens), "finish_reason": reason}))
            else:
                sys.stdout.write(rest + "\n")
    return 0


def _ids(text: str) -> list[int]:
    from onnxshard.errors import InputError

    try:
        return [int(t) for t in text.replace(" ", "").split(",") if t]
    except ValueError:
        raise InputError(f"--ids {text!r}: give token ids separated by commas, e.g. 1,2,3") from None
