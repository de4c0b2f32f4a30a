"""Test helpers for Ray actors."""
import time

import ray


def kill(actor, deadline_s=30.0):
    """Kill an onnxshard worker and return once it is dead. ray.kill only asks: a call sent right after it may still
    be answered, so a test that needs the loss to land before its next step asks until a call fails."""
    ray.kill(actor, no_restart=True)
    end = time.monotonic() + deadline_s
    while time.monotonic() < end:
        try:
            ray.get(actor.ready.remote(), timeout=5)
        except ray.exceptions.RayActorError:
            return
        except ray.exceptions.GetTimeoutError:
            continue
        time.sleep(0.05)
    raise AssertionError(f"the killed actor still answers after {deadline_s} s")
