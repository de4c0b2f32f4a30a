"""Generation over a split decoder: each stage worker keeps its own layers' KV cache, only the hidden state and the
token ids cross the cuts, and many sequences share the pipeline (continuous batching).

One engine thread owns the schedule (see :mod:`.decoding` for the rules): it admits waiting sequences while the
cache has room, keeps up to one decode step per stage in flight (two prefill steps: ``decoding.room``), or one
step when the stages take turns on one node's CPUs (over the direct links or actor calls: ``gen_steps``), and
hands each finished step's next tokens to the callers. The last stage samples them, with uniform numbers this
thread draws from each sequence's seeded generator. A lost worker is replaced and every sequence is prefilled
again from its tokens so far, so the tokens are the ones an undisturbed run gives.
"""

from __future__ import annotations

import collections
import itertools
import logging
import threading
import time
from dataclasses import replace
from pathlib import Path

import ray
from ray.exceptions import GetTimeoutError, RayActorError

from onnxshard import plan_store
from onnxshard.distributed import cluster
from onnxshard.distributed.config import PipelineConfig, check_config
from onnxshard.distributed.decoding import Ready, admit, next_step, room, step_groups, step_ids
from onnxshard.distributed.gen_steps import LinkedSteps, RaySteps, StepFailed, StepLost
from onnxshard.distributed.placement import Placement
from onnxshard.distributed.sequences import Sequence, SequenceState
from onnxshard.errors import InputError, PlanError, WorkerError
from onnxshard.plans import Plan
from onnxshard.runtime import arrow
from onnxshard.sampling import SamplingParams, draw

log = logging.getLogger(__name__)
FILLED = ("input_ids", "attention_mask", "position_ids")  # the inputs the generator makes for each step
LOGITS = "logits"


class Generator:
    """Generate from a decoder plan (one whose plan records KV-cache pairs) on Ray.

    kv_cache_memory: bytes of cache each stage worker may hold (``None``: unbounded). A sequence reserves room
        for its prompt plus ``max_tokens`` in every stage when it starts; one that would not fit waits, one that
        could never fit is refused. max_model_len: the longest sequence (prompt + generated) the model takes.
    max_rows: rows in one step. max_prefill_tokens: prompt tokens in one prefill step.
    step_timeout_s: a step not back in this long counts as a hung worker. take_turns: when every stage worker is
    on one node's CPUs, the stages take turns (one step in flight, each stage's session on the CPUs all of them
    reserved: ``decoding``); ``False`` keeps one step per stage in flight, each stage on its own CPUs, as where
    the workers are on several nodes or GPUs. ``turns`` says which. Other options as for Pipeline
    (cpus_per_stage, gpus_per_stage, runtime, placement_timeout_s, max_restarts, restart_window_s, ...).

        with Generator("plan/") as gen:
            tokens = gen.generate([[1, 2, 3]], SamplingParams(max_tokens=8))
    """

    def __init__(self, plan: Plan | str | Path, *, kv_cache_memory: int | None = None, max_model_len: int | None = None,
                 max_rows: int = 32, max_prefill_tokens: int = 2048, step_timeout_s: float = 120.0,
                 eos_token_id: int | None = None, take_turns: bool = True, address: str | None = None, **options):
        self.config = replace(PipelineConfig(), **options)
        check_config(self.config)
        self.plan = plan if isinstance(plan, Plan) else plan_store.open_plan(plan)
        self._check_plan()
        self.config = replace(self.config, replicas=1)  # one copy, whatever the plan was shaped for
        self.max_model_len, self.max_rows, self.max_prefill_tokens = max_model_len, max_rows, max_prefill_tokens
        self.step_timeout_s, self.eos_token_id = step_timeout_s, eos_token_id
        self._owns_ray = cluster.connect(address, self.config.connect_timeout_s)
        self.placement: Placement | None = None
        self.turns = False
        self._lock = threading.Condition()
        self._waiting: collections.deque[SequenceState] = collections.deque()
        self._running: dict[str, SequenceState] = {}
        self._in_flight: dict[int, tuple] = {}  # step id -> (rows, deadline)
        self._ids, self._step_ids = itertools.count(), itertools.count()
        self._steps: RaySteps | LinkedSteps | None = None
        self._closed = False
        self.recoveries: collections.deque[str] = collections.deque(maxlen=100)
        self.step_rows: collections.Counter[int] = collections.Counter()  # steps launched, by rows in them
        self.peak_running = 0
        self.finished: collections.Counter[str] = collections.Counter()  # sequences ended, by finish reason
        self._losses: collections.deque[float] = collections.deque(maxlen=64)
        try:
            self.placement = Placement(self.plan, self.config, owns_ray=self._owns_ray, turns=take_turns)
            self.turns = self.placement.turn_threads is not None
            self.token_bytes = self._open_caches(kv_cache_memory)
            self.kv_cache_memory = kv_cache_memory
            per_token = [b for b in self.token_bytes if b]
            self.capacity_tokens = min(kv_cache_memory // b for b in per_token) \
                if kv_cache_memory is not None and per_token else None
            self.transport = self.placement.transport(self.config.transport)
            self._steps = LinkedSteps(self.placement, self.config.worker_start_timeout_s, 2 * self.plan.num_stages) \
                if self.transport == "direct" else RaySteps(self.placement)
        except BaseException:
            self.close()
            raise
        self._thread = threading.Thread(target=self._loop, name="onnxshard-generator", daemon=True)
        self._thread.start()

    def _check_plan(self) -> None:
        plan = self.plan
        if not plan.kv_cache:
            raise PlanError(f"plan {plan.root} has no KV cache (no past_key_values.* / present.* pairs); generation "
                            "needs a decoder exported with its cache")
        if any(s.steps for s in plan.stages):
            raise PlanError("generation does not run tensor-parallel stages yet; plan with tensor_parallel=1")
        if self.config.replicas not in (None, 1):
            raise PlanError("a Generator runs one copy of the stages (replicas=1); for more, run more Generators "
                            "(Serve replicas do)")
        pasts = {p.past for p in plan.kv_cache}
        other = [t.name for t in plan.inputs if t.name not in pasts and t.name not in FILLED]
        if other or "input_ids" not in {t.name for t in plan.inputs} or LOGITS not in plan.output_names:
            raise PlanError(f"generation fills {FILLED} and reads {LOGITS!r}; this decoder takes "
                            f"{[t.name for t in plan.inputs if t.name not in pasts]} and makes "
                            f"{[n for n in plan.output_names if n not in {p.present for p in plan.kv_cache}]}")
        for pair in plan.kv_cache:
            at = [s.index for s in plan.stages if pair.past in s.input_names]
            made = [s.index for s in plan.stages if pair.present in s.output_names]
            later = [s.index for s in plan.stages if pair.present in s.input_names]
            if len(at) != 1 or at != made or later:
                where = f", and sent on to stage(s) {later}" if later else ""
                raise PlanError(f"cache pair {pair.past} -> {pair.present} is read in stage(s) {at} and written in "
                                f"{made}{where}; each layer's pair, and the attention over it, must live in one "
                                "stage (plan it again: the planner no longer cuts there)")

    def _open_caches(self, capacity: int | None) -> list[int]:
        workers = [ranks[0] for ranks in self.placement.workers[0]]
        return ray.get([w.open_cache.remote(capacity) for w in workers], timeout=self.config.worker_start_timeout_s)

    # -- the caller's side -----------------------------------------------------------------------------------
    def submit(self, prompt: list[int], params: SamplingParams | None = None) -> Sequence:
        """Start generating from ``prompt`` (token ids); returns at once with the :class:`Sequence`."""
        params = params or SamplingParams()
        if params.eos_token_id is None and self.eos_token_id is not None:
            params = replace(params, eos_token_id=self.eos_token_id)
        prompt = [int(t) for t in prompt]
        if not prompt:
            raise InputError("the prompt is empty; give at least one token")
        if self.max_model_len is not None and len(prompt) >= self.max_model_len:
            raise InputError(f"the prompt has {len(prompt)} tokens; this model takes at most {self.max_model_len} "
                             "(prompt and generated together)")
        if self.max_model_len is not None:
            params = replace(params, max_tokens=min(params.max_tokens, self.max_model_len - len(prompt)))
        seq = Sequence(f"seq-{next(self._ids)}", prompt, params)
        state = SequenceState(seq, params.generator(), arrived=time.monotonic_ns())
        verdict = admit(state.need, 0, self.capacity_tokens)
        if verdict.verdict == "refuse":
            raise InputError(f"the sequence cannot start: {verdict.why}")
        with self._lock:
            if self._closed:
                raise WorkerError("the generator is closed")
            self._waiting.append(state)
            self._lock.notify_all()
        return seq

    def generate(self, prompts: list[list[int]], params: SamplingParams | list[SamplingParams] | None = None,
                 timeout: float | None = 600.0) -> list[list[int]]:
        """Generate from every prompt at once; the generated tokens of each, in order."""
        each = params if isinstance(params, list) else [params] * len(prompts)
        seqs = [self.submit(p, s) for p, s in zip(prompts, each)]
        return [s.result(timeout) for s in seqs]

    def abort(self, seq: Sequence) -> None:
        """Stop a sequence (a client went away); its caches are freed."""
        with self._lock:
            state = self._running.get(seq.id) or next((s for s in self._waiting if s.seq is seq), None)
            if state is not None and not seq.done:
                self._finish(state, "abort")

    @property
    def stats(self) -> dict:
        with self._lock:
            return {"waiting": len(self._waiting), "running": len(self._running), "in_flight": len(self._in_flight),
                    "peak_running": self.peak_running, "aborted": self.finished["abort"], "ended": dict(self.finished),
                    "steps": sum(self.step_rows.values()), "rows": sum(k * v for k, v in self.step_rows.items()),
                    "recoveries": len(self.recoveries), "turns": self.turns}

    def close(self) -> None:
        with self._lock:
            self._closed = True
            for state in list(self._waiting) + list(self._running.values()):
                self._fail(state, WorkerError("the generator was closed"))
            self._lock.notify_all()
        thread = getattr(self, "_thread", None)
        if thread is not None and thread is not threading.current_thread():
            thread.join(timeout=10)
        if self._steps is not None:
            self._steps.close()
        if self.placement is not None:
            self.placement.close()
            self.placement = None
        if self._owns_ray and ray.is_initialized():
            ray.shutdown()
            self._owns_ray = False

    def __enter__(self) -> Generator:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -- the engine thread -----------------------------------------------------------------------------------
    def _loop(self) -> None:
        try:
            self._serve()
        except Exception as e:  # a bug here must not leave callers waiting: fail every sequence, say why
            log.exception("the generator's engine thread failed")
            with self._lock:
                self._closed = True
                for state in list(self._waiting) + list(self._running.values()):
                    self._fail(state, WorkerError(f"the generator failed: {type(e).__name__}: {e}"))

    def _serve(self) -> None:
        while True:
            with self._lock:
                if self._closed:
                    return
                self._admit()
                while self._launch():
                    pass
                if not self._in_flight:
                    self._lock.wait(timeout=0.5)
                    continue
                steps = list(self._in_flight)
            done = self._steps.ready(steps, timeout=0.05)
            with self._lock:
                for step_id in done:
                    if step_id in self._in_flight:
                        self._land(step_id)
                self._check_deadlines()

    def _admit(self) -> None:
        reserved = sum(s.need for s in self._running.values())
        while self._waiting:
            state = self._waiting[0]
            if admit(state.need, reserved, self.capacity_tokens).verdict != "admit":
                return
            self._waiting.popleft()
            self._running[state.seq.id] = state
            self.peak_running = max(self.peak_running, len(self._running))
            reserved += state.need

    def _launch(self) -> bool:
        idle = sorted((s for s in self._running.values() if not s.busy), key=lambda s: s.arrived)
        ready = [Ready(s.seq.id, len(s.all_tokens) - s.cached, s.cached) for s in idle]
        stages = self.plan.num_stages
        rows = next_step(ready, len(self._running), step_groups(stages, self.turns), self.max_rows,
                         self.max_prefill_tokens)
        if not room(rows, len(self._in_flight), stages, self.turns):
            return False
        states = [self._running[r.seq] for r in rows]
        batch = arrow.encode({"input_ids": step_ids([s.all_tokens for s in states], rows)})
        for s in states:
            s.draw = draw(s.seq.params, s.rng) if s.draw is None else s.draw
            s.busy = True
        step = {"seqs": [r.seq for r in rows], "lengths": [r.cached for r in rows], "new": rows[0].new,
                "sample": [[s.sample, s.draw] for s in states]}  # the last stage samples
        step_id = next(self._step_ids)
        self.step_rows[len(rows)] += 1
        self._in_flight[step_id] = (rows, time.monotonic() + self.step_timeout_s)
        try:
            self._steps.send(step_id, batch, step)
        except StepLost as e:
            self._recover(e)
        return True

    def _land(self, step_id: int) -> None:
        rows, _ = self._in_flight.pop(step_id)
        states = [self._running.get(r.seq) for r in rows]
        try:
            tokens = self._steps.result(step_id, self.step_timeout_s)
        except StepLost as e:
            self._recover(e)
            return
        except StepFailed as e:
            if e.kind == "CacheMiss":  # a worker lost its cache: prefill again
                self._recover(e)
                return
            error = InputError(str(e)) if e.kind == "InputError" else WorkerError(str(e))
            for state in states:
                if state is not None:
                    self._fail(state, error)
            return
        for token, r, state in zip(tokens.tolist(), rows, states):
            if state is None:  # aborted while in flight: its caches are already freed
                continue
            state.busy, state.draw = False, None
            state.cached += r.new
            if not state.seq.done:
                self._emit(state, token)

    def _emit(self, state: SequenceState, token: int) -> None:
        seq, params = state.seq, state.seq.params
        if params.eos_token_id is not None and token == params.eos_token_id and not params.ignore_eos:
            self._finish(state, "stop")
            return
        if not seq.tokens:
            seq.first_token_s = time.monotonic() - seq.submitted
        seq.tokens.append(token)
        seq._queue.put(token)
        if token in params.stop_token_ids:
            self._finish(state, "stop")
        elif len(seq.tokens) >= params.max_tokens:
            self._finish(state, "length")

    def _finish(self, state: SequenceState, reason: str, error: Exception | None = None) -> None:
        seq = state.seq
        seq.finish_reason, seq.error = reason, error
        self.finished[reason] += 1
        self._running.pop(seq.id, None)
        if state in self._waiting:
            self._waiting.remove(state)
        self._free([seq.id])
        seq._queue.put(None)
        seq._done.set()
        self._lock.notify_all()

    def _fail(self, state: SequenceState, error: Exception) -> None:
        if not state.seq.done:
            self._finish(state, "error", error)

    def _free(self, ids: list[str]) -> None:
        if self._steps is not None:
            self._steps.free(ids)

    def _check_deadlines(self) -> None:
        now = time.monotonic()
        if any(deadline < now for _, deadline in self._in_flight.values()):
            self._recover(StepLost(f"a step did not finish within step_timeout_s={self.step_timeout_s:g} s"))

    def _recover(self, error: Exception) -> None:
        """A worker, its link or its cache was lost: replace the dead workers (within the restart budget), and
        let every running sequence prefill again from its tokens so far."""
        replaced = self._replace_dead()
        what = f"{type(error).__name__}: {error}"
        self.recoveries.append(f"{what}; replaced stage(s) {replaced}; every running sequence prefills again")
        log.warning("generation step failed (%s); replaced stage(s) %s", what, replaced)
        now = time.monotonic()
        self._losses.append(now)
        window = self.config.restart_window_s
        if sum(1 for t in self._losses if now - t <= window) > self.config.max_restarts + 1:
            failure = WorkerError(f"generation lost its cache or workers {len(self._losses)} times within "
                                  f"{window:g} s, over max_restarts={self.config.max_restarts}: {what}")
            for state in list(self._running.values()):
                self._fail(state, failure)
            return
        # Steps still in flight read caches that are being dropped: forget them (their results are ignored).
        self._in_flight.clear()
        self._steps.forget()
        self._steps.relink()
        self._free(list(self._running))
        for state in self._running.values():
            state.cached, state.busy = 0, False

    def _replace_dead(self) -> list[int]:
        dead = []
        for stage, ranks in enumerate(self.placement.workers[0]):
            try:
                ray.get(ranks[0].ready.remote(), timeout=10)
            except (RayActorError, GetTimeoutError):
                dead.append(stage)
        for stage in dead:
            self.placement.replace(0, stage)
            worker = self.placement.workers[0][stage][0]
            ray.get(worker.open_cache.remote(self.kv_cache_memory), timeout=self.config.worker_start_timeout_s)
        return dead
