"""Batch inference on Ray Data: Parquet with a tensor column, a list column and an id column over several files,
through ``map_batches`` with a pool of two actors (each owning a pipeline) and through ``onnxshard batch``; every
output row equals plain ORT on its input row, joined on the id; bad rows name their column and row."""

import re
import subprocess
import sys

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


def test_onnxshard_batch_on_the_cli_writes_parquet_equal_to_ort(data, ray_session):
    import ray.data

    out = data["root"] / "out"
    address = ray_session.get_runtime_context().gcs_address
    run = subprocess.run([sys.executable, "-m", "onnxshard.cli", "batch", str(data["model"]), "--input",
                          str(data["root"] / "in"), "--output", str(out), "--columns", "x1=a", "--columns", "x2=b",
                          "--keep", "id", "--batch-size", "32", "--address", address],
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    assert f"{ROWS} rows in" in run.stdout and str(out) in run.stdout
    _check(ray.data.read_parquet(str(out)).take_all(), data["expected"])
    again = subprocess.run([sys.executable, "-m", "onnxshard.cli", "batch", str(data["model"]), "--input",
                            str(data["root"] / "in"), "--output", str(out), "--address", address],
                           capture_output=True, text=True, timeout=120)
    assert again.returncode == 2 and "exists and is not an empty folder" in again.stderr  # never overwritten


def test_a_bad_row_names_its_column_and_row(data, ray_session, tmp_path):
    """Through the CLI (its own driver: a failed Ray Data job leaves its pool actors' placement groups until the
    driver exits, see the README's limits)."""
    import ray.data

    items = [{"id": i, "a": np.zeros(8, np.float32), "b": [0.0] * (8 if i != 5 else 7)} for i in range(10)]
    ray.data.from_items(items).write_parquet(str(tmp_path / "bad"))
    run = subprocess.run([sys.executable, "-m", "onnxshard.cli", "batch", str(data["model"]), "--input",
                          str(tmp_path / "bad"), "--output", str(tmp_path / "out"), "--columns", "x1=a", "--columns",
                          "x2=b", "--keep", "id", "--batch-size", "10", "--address",
                          ray_session.get_runtime_context().gcs_address], capture_output=True, text=True, timeout=300)
    errors = [line for line in run.stderr.splitlines() if line.startswith("onnxshard: error:")]
    assert run.returncode == 2 and len(errors) == 1, run.stderr[-2000:]
    assert re.search(r"column 'b' row \d+ \(id=5\) has shape \[7\], the other rows \[8\]", errors[0]), errors
    assert not (tmp_path / "out").exists()


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
