"""``ray job submit -- onnxshard batch ...`` against a ``ray start --head`` that this test starts (with an object
store of 80 MiB) and stops: a data set three times the object store streams through, every row once, equal to
ORT, with the driver's memory growing by far less than the data."""

import contextlib
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import zoo

STORE = 80 << 20
FILES, ROWS, WIDTH = 16, 15_000, 256  # 16 x 15,000 rows x 1 KiB = 234 MiB: 3x the object store


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def head(tmp_path_factory):
    """A Ray head with a dashboard (the job server) on loopback, in a temporary folder of its own (so no later
    ``ray.init()`` finds its address file); stopped, with everything it started, after."""
    ray_cli = Path(sys.executable).parent / "ray"
    port, dashboard, agent, agent_grpc, runtime_env, metrics = (_free_port() for _ in range(6))
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0"}
    env.pop("RAY_ADDRESS", None)
    temp = tempfile.mkdtemp(prefix="rayhead")  # short: Ray's socket paths must fit 107 bytes
    log = open(tmp_path_factory.mktemp("head") / "head.log", "w")
    proc = subprocess.Popen([str(ray_cli), "start", "--head", "--block", "--port", str(port), "--num-cpus", "2",
                             "--object-store-memory", str(STORE), "--include-dashboard", "true", "--dashboard-host",
                             "127.0.0.1", "--dashboard-port", str(dashboard), "--node-ip-address", "127.0.0.1",
                             "--dashboard-agent-listen-port", str(agent), "--dashboard-agent-grpc-port",
                             str(agent_grpc), "--runtime-env-agent-port", str(runtime_env), "--metrics-export-port",
                             str(metrics),  # its own ports: another Ray on this machine (the tests') holds the defaults
                             "--temp-dir", temp, "--disable-usage-stats"], env=env, stdout=log,
                            stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{dashboard}"
    deadline = time.monotonic() + 120
    while True:
        try:
            urllib.request.urlopen(url + "/api/version", timeout=2).read()
            break
        except OSError:
            if proc.poll() is not None or time.monotonic() > deadline:
                proc.kill()
                raise RuntimeError(f"the Ray head did not start: see {log.name}") from None
            time.sleep(1)
    yield {"url": url, "env": env, "ray": str(ray_cli)}
    proc.send_signal(signal.SIGTERM)  # `ray start --block` stops what it started, draining for up to 30 s: then
    try:  # the whole process group (gcs, raylet, dashboard, workers) is killed
        proc.wait(timeout=5)
    except subprocess.TimeoutExpired:
        pass
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
        log.close()
        shutil.rmtree(temp, ignore_errors=True)


def test_ray_job_submit_streams_three_times_the_object_store_with_flat_driver_memory(head, tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq
    from ray.data.extensions import ArrowTensorArray

    model = zoo.save(zoo.mlp(layers=2, width=WIDTH), tmp_path / "model")
    (tmp_path / "in").mkdir()
    for f in range(FILES):  # a file at a time: the test holds one file's rows
        pq.write_table(pa.table({"id": np.arange(f * ROWS, (f + 1) * ROWS), "x": ArrowTensorArray.from_numpy(_x(f))}),
                       tmp_path / "in" / f"{f:02d}.parquet")
    data_mib = FILES * ROWS * WIDTH * 4 / 2**20
    assert data_mib > 2.8 * STORE / 2**20
    small, _ = _submit(head, model, str(tmp_path / "in" / "0[01].parquet"), tmp_path / "small")  # 1/8 of the data
    out = tmp_path / "out"
    (start, peak, actor, worker), stdout = _submit(head, model, tmp_path / "in", out)
    assert f"{FILES * ROWS} rows in" in stdout and f"wrote {FILES} file(s)" in stdout, stdout[-3000:]
    print(f"data {data_mib:.0f} MiB through an {STORE >> 20} MiB object store; anonymous RSS: driver {start} -> "
          f"{peak} MiB (with 1/8 of the data: {small[1]} MiB), pool actor peak {actor} MiB ({small[2]} MiB), stage "
          f"worker peak {worker} MiB ({small[3]} MiB)")
    assert peak - small[1] < 32, "the driver's memory grew with the data"
    # the pool actor holds the blocks in flight (two calls' worth): 400-660 MiB here, with no trend in the data's
    # size (benchmarks/RESULTS.md); a stage worker holds its micro-batches
    assert 0 < actor < 1024 and 0 < worker < 256 + data_mib / 2
    session = ort.InferenceSession(str(model))
    for f in range(FILES):  # each input row once, in the output file of its input file, equal to ORT
        table = pq.read_table(out / f"{f:02d}.parquet").sort_by("id")
        assert np.array_equal(table.column("id").to_numpy(), np.arange(f * ROWS, (f + 1) * ROWS))
        got = table.column("y").combine_chunks().to_numpy()
        np.testing.assert_allclose(got, session.run(None, {"x": _x(f)})[0], rtol=1e-4, atol=1e-5)


def _submit(head, model, data, out) -> tuple[tuple[int, ...], str]:
    """``ray job submit -- onnxshard batch``: (anonymous RSS in MiB of the driver at the start and at its peak, of
    the pool actor and of the stage workers at their peaks), stdout."""
    deadline = time.monotonic() + 60
    while True:  # the head's job agent may still be starting: Ray answers 500 "No available agent" until it is up
        run = subprocess.run([head["ray"], "job", "submit", "--address", head["url"], "--", sys.executable, "-m",
                              "onnxshard.cli", "batch", str(model), "--input", str(data), "--output", str(out),
                              "--keep", "id", "--batch-size", "1024", "--no-progress"],
                             env=head["env"], capture_output=True, text=True, timeout=400)
        if "No available agent" not in run.stderr or time.monotonic() > deadline:
            break
        time.sleep(2)
    assert run.returncode == 0 and "succeeded" in run.stdout, (run.stdout + run.stderr)[-3000:]
    memory = re.search(r"driver (\d+) MiB at the start, peak (\d+) MiB; pool actor peak (\d+) MiB; stage worker "
                       r"peak (\d+) MiB", run.stdout)
    return tuple(map(int, memory.groups())), run.stdout


def _x(f: int) -> np.ndarray:
    return np.random.default_rng(f).standard_normal((ROWS, WIDTH), dtype=np.float32)
