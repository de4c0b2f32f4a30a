"""Test helpers for Ray actors."""
import time

import psutil
import ray


def kill(actor, deadline_s=30.0):
    """Kill an onnxshard worker and return once it is dead and its process gone. ray.kill only asks: a call sent
    right after it may still be answered, and Ray may report the actor dead while its process still serves its
    sockets for a moment, so a test that needs the loss to land before its next step waits for both."""
    pid = ray.get(actor.ready.remote(), timeout=deadline_s)["pid"]
    ray.kill(actor, no_restart=True)
    end = time.monotonic() + deadline_s
    while time.monotonic() < end:
        try:
            ray.get(actor.ready.remote(), timeout=5)
        except ray.exceptions.RayActorError:
            break
        except ray.exceptions.GetTimeoutError:
            continue
        time.sleep(0.05)
    else:
        raise AssertionError(f"the killed actor still answers after {deadline_s} s")
    while time.monotonic() < end:
        if not _alive(pid):
            return
        time.sleep(0.02)
    raise AssertionError(f"the killed actor's process {pid} still runs after {deadline_s} s")


def _alive(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False
