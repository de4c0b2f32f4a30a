"""Generation through a split decoder with a KV cache per stage, against the best one worker does.

Same model (a Llama-style decoder built in code), same prompts and machine, in one run:

- **onnxshard**: ``Generator`` over a 2-stage plan (1 CPU per stage worker), continuous batching. Both workers are
  on this one node, so the stages take turns: one step of all running sequences in flight, each stage's session on
  2 ORT threads (the CPUs both reserved);
- with ``--at-once``, also **onnxshard, stages at once** (``take_turns=False``, as on separate nodes): 1 thread per
  stage, the running sequences dealt into 2 groups so both stages work at once;
- **(a) one ORT process with its cache**: one session on the whole model (2 threads), the same continuous batch
  (prefill each prompt as it arrives, then one decode step over every running sequence, caches padded on the
  left): the best a single worker does;
- **(b) recomputing without a cache**: the same session, every step runs each sequence's whole text again;
- **(c) two one-thread ORT processes**, each running (a)'s loop on half the sequences: what any two single-thread
  workers can do on this machine (on 2 vCPUs, two busy threads get far less than twice one thread's work done).

All sequences arrive at once; every one generates ``--max-tokens`` tokens (greedy, EOS ignored). Reported:
decode tokens/s over the whole run (generated tokens / wall time), the median time to first token, and each stage
worker's resident memory and cache bytes. Runs alternate; medians of ``--repeats``, and the median of each round's
own ratios: this VM's host switches between a fast and a slow mode for tens of seconds at a time, which moves a
2-thread ORT process by up to 1.5x and the one-thread processes far less (benchmarks/RESULTS.md).

    .venv/bin/python benchmarks/generation.py [--sequences 16] [--max-tokens 64] [--layers 8] [--d 512] [--repeats 3]
        [--no-recompute] [--at-once]
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np

import onnxshard
from onnxshard import decoder_models as dm
from onnxshard.distributed.decoding import Ready, step_inputs
from onnxshard.models import save
from onnxshard.units import human_bytes


def prompts(count: int, vocab: int, seed: int = 0) -> list[list[int]]:
    rng = np.random.default_rng(seed)
    return [rng.integers(5, vocab, int(rng.integers(16, 48))).tolist() for _ in range(count)]


class OrtEngine:
    """One ORT session on the whole model, decoding a continuous batch with its cache (or without, recomputing)."""

    def __init__(self, path: Path, threads: int):
        import onnxruntime as ort

        so = ort.SessionOptions()
        so.intra_op_num_threads, so.inter_op_num_threads = threads, 1
        self.session = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
        self.outputs = [o.name for o in self.session.get_outputs()]
        self.pasts = {i.name: (i.shape[1], i.shape[3]) for i in self.session.get_inputs()
                      if i.name.startswith("past_key_values")}

    def _run(self, tokens, rows, caches=None, past=None):
        """One step; ``past`` the batch's padded caches, else gathered from each row's ``caches``."""
        feeds = step_inputs(tokens, rows)
        if past is None:
            longest = max(r.cached for r in rows)
            past = {}
            for name, (heads, hd) in self.pasts.items():
                past[name] = np.zeros((len(rows), heads, longest, hd), np.float32)
                for i, r in enumerate(rows):
                    if r.cached:
                        past[name][i, :, longest - r.cached:] = caches[i][name]
        out = dict(zip(self.outputs, self.session.run(None, {**feeds, **past})))
        return out["logits"][:, -1], {name: out[name.replace("past_key_values", "present")] for name in self.pasts}

    def generate(self, prompts: list[list[int]], max_tokens: int, cache: bool = True):
        start = time.perf_counter()
        tokens = [list(p) for p in prompts]
        caches: list[dict] = [{}] * len(prompts)
        first: list[float] = [0.0] * len(prompts)
        for i, p in enumerate(prompts):  # prefill each as it arrives
            logits, present = self._run([tokens[i]], [Ready(str(i), len(p), 0)])
            caches[i] = {name: value[0] for name, value in present.items()}
            tokens[i].append(int(np.argmax(logits[0])))
            first[i] = time.perf_counter() - start
        past = None
        for _ in range(max_tokens - 1):
            if cache:  # the same rows every step: the presents are the next past as they are, padding included
                rows = [Ready(str(i), 1, len(t) - 1) for i, t in enumerate(tokens)]
                logits, past = self._run(tokens, rows, caches, past)
            else:  # no cache: each sequence's whole text again, padded on the left to the longest
                longest = max(len(t) for t in tokens)
                padded = [[0] * (longest - len(t)) + t for t in tokens]
                feeds = {"input_ids": np.array(padded, np.int64),
                         "attention_mask": np.array([[0] * (longest - len(t)) + [1] * len(t) for t in tokens]),
                         "position_ids": np.array([[0] * (longest - len(t)) + list(range(len(t))) for t in tokens])}
                for name, (heads, hd) in self.pasts.items():
                    feeds[name] = np.zeros((len(tokens), heads, 0, hd), np.float32)
                logits = self.session.run(["logits"], feeds)[0][:, -1]
            for i, t in enumerate(tokens):
                t.append(int(np.argmax(logits[i])))
        wall = time.perf_counter() - start
        return [t[len(p):] for t, p in zip(tokens, prompts)], wall, statistics.median(first)


def _half(path, prompts, max_tokens, barrier, out):
    engine = OrtEngine(path, 1)
    barrier.wait()
    out.put(engine.generate(prompts, max_tokens)[1:])


def run_two_processes(path, prompts, max_tokens):
    """(c): two one-thread processes, half the sequences each; wall time from the common start to the last end."""
    import multiprocessing as mp

    ctx = mp.get_context("spawn")
    barrier, out = ctx.Barrier(3), ctx.Queue()
    halves = [prompts[0::2], prompts[1::2]]
    procs = [ctx.Process(target=_half, args=(path, h, max_tokens, barrier, out)) for h in halves]
    for p in procs:
        p.start()
    barrier.wait()
    start = time.perf_counter()
    results = [out.get(timeout=600) for _ in procs]
    wall = time.perf_counter() - start
    for p in procs:
        p.join()
    return wall, statistics.median(first for _, first in results)


def run_onnxshard(plan, prompts, max_tokens, turns=True):
    import psutil

    from onnxshard.distributed.generator import Generator
    from onnxshard.sampling import SamplingParams

    with Generator(plan, cpus_per_stage=1.0, take_turns=turns) as gen:
        gen.generate([prompts[0][:4]], SamplingParams(max_tokens=2))  # warm both stages
        start = time.perf_counter()
        seqs = [gen.submit(p, SamplingParams(max_tokens=max_tokens)) for p in prompts]
        out = [s.result(600) for s in seqs]
        wall = time.perf_counter() - start
        rss = [psutil.Process(ranks[0]["pid"]).memory_info().rss for ranks in gen.placement.info[0]]
        steps = gen.stats
    return out, wall, statistics.median(s.first_token_s for s in seqs), rss, steps


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sequences", type=int, default=16)
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--d", type=int, default=512)
    ap.add_argument("--vocab", type=int, default=8192)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--no-recompute", action="store_true", help="skip (b), which takes minutes on larger models")
    ap.add_argument("--at-once", action="store_true", help="also run the stages at once, one thread each")
    args = ap.parse_args()
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    import ray

    folder = Path(tempfile.mkdtemp(prefix="onnxshard-genbench-"))
    model = dm.llama_cached(layers=args.layers, d=args.d, heads=8, kv_heads=2, ffn=int(2.75 * args.d),
                            vocab=args.vocab)
    path = save(model, folder / "model", external=True)
    weights = (folder / "model" / "model.onnx.data").stat().st_size
    plan = onnxshard.plan(path, folder / "plan", stages=2)
    cap_plan = onnxshard.plan(path, folder / "capped", max_stage_memory=int(weights * 0.6))
    asks = prompts(args.sequences, args.vocab)
    print(f"model: {args.layers} layers, d={args.d}, vocab {args.vocab}, weights {human_bytes(weights)}; "
          f"{args.sequences} sequences, prompts {min(map(len, asks))}-{max(map(len, asks))} tokens, "
          f"{args.max_tokens} tokens each; stages' weights {[human_bytes(s.param_bytes) for s in plan.stages]}")
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    cached, recompute = OrtEngine(path, 2), OrtEngine(path, 2)
    ours, at_once = "onnxshard (2 stages taking turns, 2 threads each)", "onnxshard (2 stages at once x 1 thread)"
    rows = {ours: [], **({at_once: []} if args.at_once else {}), "(a) ORT, cache, 2 threads": [],
            "(c) 2 ORT processes x 1 thread, cache": [], **({} if args.no_recompute else {"(b) ORT, no cache": []})}
    generated = args.sequences * args.max_tokens
    for r in range(args.repeats):
        out_a, wall_a, ttft_a = cached.generate(asks, args.max_tokens)
        out_s, wall_s, ttft_s, rss, steps = run_onnxshard(plan, asks, args.max_tokens)
        assert out_s == out_a, "onnxshard's greedy tokens differ from ORT's"
        rows[ours].append((generated / wall_s, ttft_s))
        if args.at_once:
            out_o, wall_o, ttft_o, _, _ = run_onnxshard(plan, asks, args.max_tokens, turns=False)
            assert out_o == out_a, "onnxshard's greedy tokens differ from ORT's"
            rows[at_once].append((generated / wall_o, ttft_o))
        rows["(a) ORT, cache, 2 threads"].append((generated / wall_a, ttft_a))
        wall_c, ttft_c = run_two_processes(path, asks, args.max_tokens)
        rows["(c) 2 ORT processes x 1 thread, cache"].append((generated / wall_c, ttft_c))
        if r == 0 and not args.no_recompute:  # slow: once
            out_b, wall_b, ttft_b = recompute.generate(asks, args.max_tokens, cache=False)
            rows["(b) ORT, no cache"].append((generated / wall_b, ttft_b))
        print(f"run {r}: onnxshard {generated / wall_s:.1f} tok/s, ORT+cache {generated / wall_a:.1f} tok/s, "
              f"2 processes {generated / wall_c:.1f} tok/s; "
              f"steps {steps['steps']}, rows/step {steps['rows'] / max(1, steps['steps']):.1f}", flush=True)
    paired = {name: [t / a for (t, _), (a, _) in zip(values, rows["(a) ORT, cache, 2 threads"])]
              for name, values in rows.items()}
    base = statistics.median(t for t, _ in rows["(a) ORT, cache, 2 threads"])
    print("\n| engine | decode tokens/s | vs (a) | each round vs its (a) | median time to first token |")
    print("|---|---|---|---|---|")
    for name, values in rows.items():
        tps = statistics.median(t for t, _ in values)
        ttft = statistics.median(f for _, f in values)
        rounds = ", ".join(f"{r:.2f}" for r in paired[name])
        print(f"| {name} | {tps:.1f} | {tps / base:.2f}x | {rounds} (median {statistics.median(paired[name]):.2f}x) "
              f"| {ttft * 1000:.0f} ms |")
    token_bytes = sum(2 * 2 * (args.d // 8) * 4 for _ in range(args.layers))  # K and V, kv_heads 2, float32
    print(f"\nstage workers' resident memory: {[human_bytes(b) for b in rss]}; cache per token (all layers): "
          f"{token_bytes} B, for all sequences at the end "
          f"{human_bytes(token_bytes * sum(len(p) + args.max_tokens for p in asks))}")
    from onnxshard.distributed.generator import Generator
    from onnxshard.sampling import SamplingParams

    cap_tokens = min(8, args.max_tokens)
    with Generator(cap_plan, cpus_per_stage=1.0) as gen:
        got = gen.generate(asks[:2], SamplingParams(max_tokens=cap_tokens))
    print(f"over the cap: weights {human_bytes(weights)}, max_stage_memory {human_bytes(int(weights * 0.6))} -> "
          f"{cap_plan.num_stages} stages of {[human_bytes(s.param_bytes) for s in cap_plan.stages]}; generated "
          f"{sum(map(len, got))} tokens, equal to ORT: {got == [t[:cap_tokens] for t in out_a[:2]]}")
    ray.shutdown()


if __name__ == "__main__":
    main()
