"""Batch inference on Ray Data: Parquet with a tensor column, a list column and an id column over several files,
through ``map_batches`` with a pool of two actors (each owning a pipeline) and through ``onnxshard batch``; every
output row equals plain ORT on its input row, joined on the id; bad rows name their column and row."""

import json
import os
import re
import signal
import subprocess
import sys
import time

import numpy as np
import onnxruntime as ort
import pytest
import zoo

ROWS = 120


@pytest.fixture(scope="module")
def data(ray_session, tmp_path_factory):
    """multi_io (inputs x1, x2 [batch, 8]) and 3 Parquet files: x1 as a tensor column ``a``, x2 as a list column
    ``b`` of doubles, and ``id``."""
    import ray.data

    root = tmp_path_factory.mktemp("batch")
    model = zoo.save(zoo.multi_io(), root / "model")
    rng = np.random.default_rng(0)
    x1 = rng.standard_normal((ROWS, 8)).astype(np.float32)
    x2 = rng.standard_normal((ROWS, 8)).astype(np.float32)
    items = [{"id": i, "a": x1[i], "b": [float(v) for v in x2[i]]} for i in range(ROWS)]
    ray.data.from_items(items).repartition(3).write_parquet(str(root / "in"))
    expected = dict(zip(["out", "early", "total"],
                        ort.InferenceSession(str(model)).run(None, {"x1": x1, "x2": x2.astype(np.float64)
                                                                    .astype(np.float32)})))
    return {"root": root, "model": model, "expected": expected}


def _check(rows, expected):
    rows = sorted(rows, key=lambda r: r["id"])
    assert [r["id"] for r in rows] == list(range(ROWS))  # each input row exactly once
    got = np.stack([r["out"] for r in rows])
    np.testing.assert_allclose(got, expected["out"], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(np.stack([r["early"] for r in rows]), expected["early"], rtol=1e-5, atol=1e-6)


def test_map_batches_with_a_pool_of_two_pipelines_equals_ort(data):
    import ray.data

    from onnxshard.data import predict

    ds = predict(ray.data.read_parquet(str(data["root"] / "in")), data["model"], replicas=2, batch_size=16,
                 columns={"x1": "a", "x2": "b"}, keep=("id",), stages=2)
    rows = ds.take_all()
    assert set(rows[0]) == {"id", "out", "early"}  # "total" sums the whole batch: no row of its own
    _check(rows, data["expected"])


def _cli(*args, address, timeout=300):
    return subprocess.run([sys.executable, "-m", "onnxshard.cli", "batch", *map(str, args), "--no-progress",
                           "--address", address], capture_output=True, text=True, timeout=timeout)


def _inputs(data, *extra):
    return [data["model"], "--input", data["root"] / "in", "--columns", "x1=a", "--columns", "x2=b", "--keep", "id",
            *extra]


def test_onnxshard_batch_on_the_cli_writes_a_file_per_input_equal_to_ort(data, ray_session):
    import ray.data

    out = data["root"] / "out"
    address = ray_session.get_runtime_context().gcs_address
    run = _cli(*_inputs(data, "--output", out, "--batch-size", "32"), address=address)
    assert run.returncode == 0, run.stderr[-2000:]
    assert f"{ROWS} rows in" in run.stdout and "wrote 3 file(s)" in run.stdout and str(out) in run.stdout
    assert re.search(r"stage 1: busy \d+\.\d s, idle", run.stdout), run.stdout
    assert sorted(p.name for p in out.iterdir()) == sorted(
        ["_onnxshard_manifest.jsonl", *(p.name for p in (data["root"] / "in").iterdir())])
    _check(ray.data.read_parquet(str(out)).take_all(), data["expected"])
    again = _cli(data["model"], "--input", data["root"] / "in", "--output", out, address=address)
    assert again.returncode == 2 and "holds the manifest of an earlier job; pass --resume" in again.stderr
    done = _cli(*_inputs(data, "--output", out, "--resume"), address=address)  # nothing left: nothing redone
    assert done.returncode == 0 and "0 rows in" in done.stdout and "3 done before (--resume)" in done.stdout
    other = _cli(data["model"], "--input", data["root"] / "in", "--output", out, "--resume", address=address)
    assert other.returncode == 2 and "ran with other settings (columns, keep differ" in other.stderr, other.stderr


def _bad_rows(path, odd=(5,)):
    import ray.data

    items = [{"id": i, "a": np.zeros(8, np.float32), "b": [0.5] * (8 if i not in odd else 7)} for i in range(10)]
    ray.data.from_items(items).repartition(1).write_parquet(str(path))
    (file,) = path.iterdir()
    return file


def _place(file, id_):
    """The row of ``file`` holding ``id_`` (Ray Data writes rows in any order)."""
    import pyarrow.parquet as pq

    return pq.read_table(file).column("id").to_pylist().index(id_)



def test_each_row_set_aside_is_named_whether_or_not_good_rows_share_its_batch():
    """A bad row among good ones is blamed alone; a batch of bad rows only (Ray Data batches rows in any order)
    fails them all, and each reason still names its row."""
    from onnxshard.data.columns import good_rows
    from onnxshard.plans import TensorSpec

    def batch(lengths):
        cells = np.empty(len(lengths), object)
        cells[:] = [np.full(n, 0.5, np.float32) for n in lengths]
        return {"b": cells, "id": np.arange(10, 10 + len(lengths))}

    inputs = (TensorSpec("x2", "float32", ("batch", 8)),)
    good, feeds, reasons = good_rows(batch([8, 7, 8]), inputs, {"x2": "b"}, "a batch of 3 rows", ("id",))
    assert good.tolist() == [0, 2] and feeds["x2"].shape == (2, 8) and list(reasons) == [1]
    assert "column 'b' row 1 (id=11) has shape [7], the other rows [8]" in reasons[1]
    good, feeds, reasons = good_rows(batch([7, 7]), inputs, {"x2": "b"}, "a batch of 2 rows", ("id",))
    assert feeds is None and sorted(reasons) == [0, 1]
    for i in (0, 1):
        assert reasons[i].startswith(f"row {i} (id={10 + i}): a batch of 2 rows: column 'b' gives rows of shape [7]")

@pytest.mark.parametrize("batch_size", [10, 1])
def test_a_bad_row_names_its_file_row_and_column(data, ray_session, tmp_path, batch_size):
    """Through the CLI, as a user runs it (its own driver, which exits with status 2); the bad row among good ones,
    or alone in its batch."""
    file = _bad_rows(tmp_path / "bad")
    run = _cli(data["model"], "--input", tmp_path / "bad", "--output", tmp_path / "out", "--columns", "x1=a",
               "--columns", "x2=b", "--keep", "id", "--batch-size", batch_size,
               address=ray_session.get_runtime_context().gcs_address)
    errors = [line for line in run.stderr.splitlines() if line.startswith("onnxshard: error:")]
    assert run.returncode == 2 and len(errors) == 1, run.stderr[-2000:]
    row, name = _place(file, 5), re.escape(str(file))
    want = rf"column 'b' row {row} of file {name} \(id=5\) has shape \[7\], the other rows \[8\]" if batch_size > 1 \
        else rf"row {row} of file {name} \(id=5\): a batch of 1 rows: column 'b' gives rows of shape \[7\]"
    assert re.search(want, errors[0]), errors
    assert [p.name for p in (tmp_path / "out").iterdir()] == ["_onnxshard_manifest.jsonl"]  # no partial file


def test_on_error_skip_writes_bad_rows_to_a_rejects_file(data, ray_session, tmp_path):
    """The job the CLI runs, in this process (the CLI itself is tested above)."""
    import pyarrow.parquet as pq

    from onnxshard.data import job

    file = _bad_rows(tmp_path / "bad", odd=(0, 5, 9))
    out = tmp_path / "out"
    summary = job.run(str(data["model"]), (tmp_path / "bad").as_uri(), out, columns={"x1": "a", "x2": "b"},  # a URI
                      keep=("id",), batch_size=4, on_error="skip", progress=False, stages=2)
    assert "7 rows in" in summary.text() and "3 row(s) rejected" in summary.text()
    good = pq.read_table(out / file.name).to_pydict()
    assert sorted(good["id"]) == [1, 2, 3, 4, 6, 7, 8]
    x = np.zeros((1, 8), np.float32)
    want = ort.InferenceSession(str(data["model"])).run(["out"], {"x1": x, "x2": x + 0.5})[0][0]
    np.testing.assert_allclose(np.stack([np.asarray(v) for v in good["out"]]), np.stack([want] * 7), rtol=1e-5)
    rejects = sorted(pq.read_table(out / "_rejects" / file.name).to_pylist(), key=lambda r: r["id"])
    assert [(r["id"], r["row"]) for r in rejects] == [(i, _place(file, i)) for i in (0, 5, 9)]
    # a bad row among good ones "has shape [7], the other rows [8]"; one that Ray Data batched alone (or with bad
    # ones only) "gives rows of shape [7]" where the model takes [8]: either way its reason names it and its file
    assert all(f"of file {file}" in r["error"] and "shape [7]" in r["error"] for r in rejects), \
        [r["error"] for r in rejects]


def test_resume_after_the_driver_is_killed_writes_each_row_once(data, ray_session, tmp_path):
    """The driver is SIGKILLed once some input files are done; ``--resume`` skips those (their outputs are not
    rewritten) and finishes the rest: every row exactly once, equal to ORT."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    import ray.data

    rng = np.random.default_rng(1)
    # rows one at a time; seven files of 4 rows and one of 68: however fast the machine, the long file is still
    # running when a short one is done (with 8 equal files, a fast run once finished them all between two polls)
    n, sizes = 96, [4] * 7 + [68]
    files = len(sizes)
    x1, x2 = (rng.standard_normal((n, 8)).astype(np.float32) for _ in range(2))
    table = ray.data.from_items([{"id": i, "a": x1[i], "b": x2[i]} for i in range(n)]).to_arrow_refs()
    table = pa.concat_tables(ray_session.get(table)).sort_by("id")
    (tmp_path / "in").mkdir()
    for i, start in enumerate(np.cumsum([0] + sizes[:-1])):
        pq.write_table(table.slice(int(start), sizes[i]), tmp_path / "in" / f"part-{i}.parquet")
    out, manifest = tmp_path / "out", tmp_path / "out" / "_onnxshard_manifest.jsonl"
    address = ray_session.get_runtime_context().gcs_address
    args = [sys.executable, "-m", "onnxshard.cli", "batch", data["model"], "--input", tmp_path / "in", "--output", out,
            "--columns", "x1=a", "--columns", "x2=b", "--keep", "id", "--batch-size", "1", "--no-progress",
            "--address", address]
    driver = subprocess.Popen(list(map(str, args)), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline, done = time.monotonic() + 240, 0
    while time.monotonic() < deadline and driver.poll() is None:
        done = len(manifest.read_text().splitlines()) - 1 if manifest.exists() else 0
        if done >= 1:
            break
        time.sleep(0.02)
    driver.kill()
    driver.wait(timeout=30)
    finished = [json.loads(line) for line in manifest.read_text().splitlines()[1:]]
    assert 1 <= len(finished) < files, f"the kill should land mid-job: {len(finished)} of {files} files were done"
    before = {f["output"]: (out / f["output"]).stat().st_mtime_ns for f in finished}
    run = subprocess.run(list(map(str, args + ["--resume"])), capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    assert f"{len(finished)} done before (--resume)" in run.stdout
    assert {name: (out / name).stat().st_mtime_ns for name in before} == before  # not redone
    assert not list(out.glob(".*")), "no temporary file is left"
    assert len(manifest.read_text().splitlines()) == 1 + files
    rows = sorted(ray.data.read_parquet(str(out)).take_all(), key=lambda r: r["id"])
    assert [r["id"] for r in rows] == list(range(n))
    want = ort.InferenceSession(str(data["model"])).run(["out"], {"x1": x1, "x2": x2})[0]
    np.testing.assert_allclose(np.stack([r["out"] for r in rows]), want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("victim", ["stage worker", "pool actor"])
def test_a_worker_killed_mid_job_loses_and_repeats_no_row(data, ray_session, victim):
    """SIGKILL one stage worker (the pipeline replaces it and replays its micro-batches) or the whole pool actor
    (Ray Data restarts it and redoes its batch) once the first block is back: each row still comes out once."""
    import ray.data

    from onnxshard.data import predict
    from onnxshard.data.job import Stats

    stats = ray_session.remote(num_cpus=0)(Stats).remote()
    ds = predict(ray.data.read_parquet(str(data["root"] / "in")).repartition(12), data["model"], replicas=1,
                 batch_size=1, columns={"x1": "a", "x2": "b"}, keep=("id",), stages=2, stats=stats)
    blocks = iter(ds.iter_batches(batch_size=None, batch_format="numpy"))
    got = [next(blocks)]
    (first,) = ray_session.get(stats.get.remote()).values()
    os.kill(first["workers"][1] if victim == "stage worker" else first["pid"], signal.SIGKILL)
    got.extend(blocks)
    (last,) = ray_session.get(stats.get.remote()).values()
    if victim == "stage worker":
        assert last["recoveries"] >= 1 and last["pid"] == first["pid"]
    else:  # the restarted actor ran batches after the kill
        assert last["pid"] != first["pid"]
    rows = [{k: b[k][i] for k in b} for b in got for i in range(len(b["id"]))]
    _check(rows, data["expected"])


def test_columns_map_to_inputs_and_refuse_what_does_not_fit():
    """The batch <-> feeds rules without Ray."""
    from onnxshard.data.columns import column_map, row_outputs, to_columns, to_feeds
    from onnxshard.errors import InputError
    from onnxshard.plans import TensorSpec

    inputs = (TensorSpec("x", "float32", ("batch", 2)), TensorSpec("n", "int64", ("batch",)))
    outputs = (TensorSpec("y", "float32", ("batch", 2)), TensorSpec("total", "float32", ()))
    mapping = column_map(inputs, {"x": "feat"})
    assert mapping == {"x": "feat", "n": "n"}
    with pytest.raises(InputError, match=r"unknown model input\(s\) \['z'\]"):
        column_map(inputs, {"z": "c"})
    batch = {"feat": np.array([[1.0, 2.0], [3.0, 4.0]]), "n": np.array([1, 2], np.int32), "id": np.array([7, 8])}
    feeds = to_feeds(batch, inputs, mapping)
    assert feeds["x"].dtype == np.float32 and feeds["n"].dtype == np.int64  # cast within the kind
    with pytest.raises(InputError, match="no column 'feat' for model input 'x'"):
        to_feeds({"n": batch["n"]}, inputs, mapping)
    with pytest.raises(InputError, match="column 'feat' holds <U1"):
        to_feeds({**batch, "feat": np.array([["a", "b"], ["c", "d"]])}, inputs, mapping)
    with pytest.raises(InputError, match=r"column 'feat' gives rows of shape \[3\]"):
        to_feeds({**batch, "feat": np.zeros((2, 3))}, inputs, mapping)
    assert row_outputs(inputs, outputs, None) == ("y",)
    with pytest.raises(InputError, match="'total' has no batch axis 0"):
        row_outputs(inputs, outputs, ("total",))
    assert list(to_columns({"y": feeds["x"]}, batch, ("id",))) == ["id", "y"]
    with pytest.raises(InputError, match=r"--keep column\(s\) \['nope'\]"):
        to_columns({"y": feeds["x"]}, batch, ("nope",))


@pytest.mark.parametrize("odd", [0, 2])
def test_the_ragged_row_is_blamed_wherever_it_is(odd):
    from onnxshard.data.columns import to_feeds
    from onnxshard.errors import InputError
    from onnxshard.plans import TensorSpec

    column = np.empty(3, dtype=object)
    for i in range(3):
        column[i] = np.zeros(3 if i == odd else 2, np.float32)
    spec = (TensorSpec("x", "float32", ("batch", "n")),)  # no fixed row shape: most rows decide
    with pytest.raises(InputError, match=rf"column 'x' row {odd} \(id={10 + odd}\) has shape \[3\], the other rows \[2\]"):
        to_feeds({"x": column, "id": np.arange(10, 13)}, spec, {"x": "x"}, keep=("id",))


def test_read_tasks_take_the_cpus_the_stage_workers_leave(tmp_path):
    """Ray Data's default (1 CPU a read task) while one is free; what is left, down to 0, when the stage workers
    hold more: never a read task waiting for a CPU that the pipelines hold for the whole job."""
    from onnxshard.data.job import reading_cpus

    model = str(zoo.save(zoo.mlp(), tmp_path / "m"))
    assert reading_cpus(8, model, 1, {"stages": 2, "cpus_per_stage": 1.0}) is None
    assert reading_cpus(8, model, 3, {"stages": 2, "cpus_per_stage": 1.0}) is None  # 6 held, 2 free
    assert reading_cpus(8, model, 3, {"stages": 2, "cpus_per_stage": 1.25}) == 0.5
    assert reading_cpus(2, model, 1, {"stages": 2, "cpus_per_stage": 1.0}) == 0.0
    assert reading_cpus(2, model, 1, {"stages": 3, "cpus_per_stage": 0.5}) == 0.5


def test_fixed_size_and_nested_list_columns_feed_a_3d_input(ray_session, tmp_path):
    """A [batch, seq, d] input read from a list<list<float>> column (Ray Data hands it over as object arrays of
    arrays) and its [batch, seq] mask from a fixed_size_list column: equal to ORT on the same rows."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    import ray.data

    from onnxshard.data import predict

    model = zoo.save(zoo.transformer(layers=2), tmp_path / "m")
    rng = np.random.default_rng(3)
    x = rng.standard_normal((12, 4, 32)).astype(np.float32)
    mask = (rng.random((12, 4)) > 0.3).astype(np.float32)
    (tmp_path / "in").mkdir()
    pq.write_table(pa.table({"id": np.arange(12), "x": pa.array(x.tolist(), pa.list_(pa.list_(pa.float32()))),
                             "mask": pa.array(mask.tolist(), pa.list_(pa.float32(), 4))}), tmp_path / "in" / "a.parquet")
    rows = predict(ray.data.read_parquet(str(tmp_path / "in")), model, batch_size=5, keep=("id",), stages=2).take_all()
    rows = sorted(rows, key=lambda r: r["id"])
    want = ort.InferenceSession(str(model)).run(None, {"x": x, "mask": mask})[0]
    np.testing.assert_allclose(np.stack([r["y"] for r in rows]), want, rtol=1e-5, atol=1e-5)


def test_a_row_with_ragged_nested_lists_is_named():
    from onnxshard.data.columns import to_feeds
    from onnxshard.errors import RowError
    from onnxshard.plans import TensorSpec

    column = np.empty(2, dtype=object)  # as Ray Data gives list<list<float>>: 1-d object arrays of arrays
    for row, widths in enumerate([(4, 4), (4, 3)]):
        column[row] = np.empty(2, dtype=object)
        for i, width in enumerate(widths):
            column[row][i] = np.zeros(width, np.float32)
    spec = (TensorSpec("x", "float32", ("batch", 2, 4)),)
    assert to_feeds({"x": column[:1]}, spec, {"x": "x"})["x"].shape == (1, 2, 4)
    with pytest.raises(RowError, match=r"column 'x' row 1 \(id=8\) holds nested lists of different lengths"):
        to_feeds({"x": column, "id": np.array([7, 8])}, spec, {"x": "x"}, keep=("id",))


def test_resume_clears_only_the_temporary_files_a_job_makes(tmp_path):
    from onnxshard.data import files

    (tmp_path / "_rejects").mkdir()
    ours = [files.temporary(tmp_path / "a.parquet"), files.temporary(tmp_path / "_rejects" / "a.parquet")]
    theirs = [tmp_path / ".notes.tmp", tmp_path / "a.parquet.tmp", tmp_path / ".a.parquet.1234567.tmp"]
    for path in ours + theirs:
        path.write_text("x")
    assert files.clear_partial(tmp_path) == 2
    assert not any(p.exists() for p in ours) and all(p.exists() for p in theirs)
