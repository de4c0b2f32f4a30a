"""Plans on object storage (any URI pyarrow.fs opens): the driver reads plan.json alone; each stage worker copies
its own stage's files and only the weight byte ranges they read into a cache on its node, reused by the next."""

import json
from pathlib import Path

import pytest
import zoo

import onnxshard
from onnxshard import digests, plan_store
from onnxshard.errors import PlanError
from onnxshard.runtime import tools


@pytest.fixture(scope="module")
def stored(tmp_path_factory):
    """A 3-stage plan whose weights are links to the model's one weight file, served as a file:// URI."""
    tmp = tmp_path_factory.mktemp("store")
    path = zoo.save(zoo.transformer(layers=6, d=64), tmp / "model", external=True)
    plan = onnxshard.plan(path, tmp / "bucket" / "plan", stages=3)
    assert plan.weights.mode == "link" and len(plan.weights.files) == 1
    return path, plan, "file://" + str(plan.root)


def _ranges(cache: Path, plan) -> dict[str, list]:
    folder = next(p for p in cache.iterdir() if p.is_dir())
    return {name: json.loads((folder / (name + ".ranges.json")).read_text()) for name in plan.weights.files
            if (folder / (name + ".ranges.json")).is_file()}


def test_each_stage_copies_its_own_files_and_weight_ranges_and_a_second_worker_reuses_them(stored, tmp_path):
    path, plan, uri = stored
    (name, size), = plan.weights.files.items()
    driver = plan_store.read_plan(uri)
    assert driver.uri == uri and driver.root is None and driver.location == uri
    assert [s.file for s in driver.stages] == [s.file for s in plan.stages]

    cache = tmp_path / "cache"
    first = plan_store.load_stage(uri, 0, cache)
    copy = first.root
    assert first.uri == uri and (copy / plan.stages[0].file).is_file()
    assert not (copy / plan.stages[1].file).exists() and not (copy / plan.stages[2].file).exists()
    held = _ranges(cache, plan)[name]
    wanted = plan_store.merged(sum(plan_store.weight_ranges(first, 0).values(), []), 0)
    assert held == [list(r) for r in wanted]
    assert 0 < sum(n for _, n in held) < size / 2  # a part of the file, never the whole
    weights = copy / name
    assert weights.stat().st_size == size and weights.stat().st_blocks * 512 < size  # sparse: the rest takes no disk

    mtime = weights.stat().st_mtime_ns
    again = plan_store.load_stage(uri, 0, cache)  # a second worker of stage 0 on this node: nothing to copy
    assert again.root == copy and weights.stat().st_mtime_ns == mtime
    plan_store.load_stage(uri, 2, cache)  # stage 2's worker adds its own ranges to the same copy
    assert sum(n for _, n in _ranges(cache, plan)[name]) > sum(n for _, n in held)

    # the copies run: stage by stage, each from its own node copy, equal to ORT on the whole model
    feeds = tools.random_feeds(plan.inputs, dims={"batch": 2, "seq": 5}, seed=1)
    values = dict(feeds)
    for k in range(3):
        stage_plan = plan_store.load_stage(uri, k, cache)
        values.update(tools.run_model(stage_plan.stage_path(k), {t.name: values[t.name]
                                                                 for t in stage_plan.stages[k].inputs}))
    assert tools.max_differences(tools.run_model(path, feeds), {"y": values["y"]}) == {"y": 0.0}


def test_a_large_weight_file_is_checked_by_its_sampled_digest_from_the_blocks_copied(stored, tmp_path, monkeypatch):
    """Weight files over FULL_CHECK_BYTES (made small here) get their digest's sample blocks copied too: a changed
    byte in them is found, as in a local plan."""
    path, _, _ = stored
    for module in (digests, plan_store, onnxshard.plans):
        monkeypatch.setattr(module, "FULL_CHECK_BYTES", 4096)
    plan = onnxshard.plan(path, tmp_path / "bucket" / "plan", stages=3)  # digests recorded as samples
    (name, size), = plan.weights.files.items()
    uri = "file://" + str(plan.root)
    copy = plan_store.load_stage(uri, 1, tmp_path / "cache").root
    blocks = plan_store.sample_ranges(size)
    assert len(blocks) == digests.SAMPLE_BLOCKS and digests.sample_digest(copy / name) == plan.weights.sample[name]
    source = Path(plan.root) / name  # the object store's file changes under a sampled block: refused on the node
    data = bytearray(source.read_bytes())
    offset = blocks[len(blocks) // 2][0]
    data[offset] ^= 0xFF
    source.unlink()  # a hard link to the model's weights: replace it, do not write through it
    source.write_bytes(bytes(data))
    with pytest.raises(PlanError, match="changed after planning"):
        plan_store.load_stage(uri, 1, tmp_path / "fresh")


def test_a_plan_in_a_mock_s3_bucket_is_copied_in_part_and_runs(stored, tmp_path, monkeypatch):
    """moto's S3 server on loopback, reached by pyarrow's own S3 client, as a real bucket would be."""
    moto_server = pytest.importorskip("moto.server")
    import pyarrow.fs as pafs

    for key, value in {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
                       "AWS_EC2_METADATA_DISABLED": "true"}.items():
        monkeypatch.setenv(key, value)
    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    try:
        host, port = server.get_host_and_port()
        options = f"endpoint_override={host}:{port}&scheme=http&region=us-east-1"
        s3, _ = pafs.FileSystem.from_uri(f"s3://bucket?{options}&allow_bucket_creation=true")
        s3.create_dir("bucket")
        path, plan, _ = stored
        pafs.copy_files(str(plan.root), "bucket/models/plan", destination_filesystem=s3)
        uri = f"s3://bucket/models/plan?{options}"
        assert plan_store.read_plan(uri).num_stages == 3
        (name, size), = plan.weights.files.items()
        copies = [plan_store.load_stage(uri, 1, tmp_path / "cache")]  # the middle stage: a part of the file
        assert 0 < sum(n for _, n in _ranges(tmp_path / "cache", plan)[name]) < size / 2
        copies = [plan_store.load_stage(uri, k, tmp_path / "cache") for k in range(3)]
        assert len({c.root for c in copies}) == 1
        feeds = tools.random_feeds(plan.inputs, dims={"batch": 2, "seq": 4}, seed=3)
        values = dict(feeds)
        for k, copy in enumerate(copies):
            values.update(tools.run_model(copy.stage_path(k), {t.name: values[t.name] for t in copy.stages[k].inputs}))
        assert tools.max_differences(tools.run_model(path, feeds), {"y": values["y"]}) == {"y": 0.0}
        with pytest.raises(PlanError, match="plan.json is missing"):
            plan_store.read_plan(f"s3://bucket/nothing?{options}")
    finally:
        server.stop()


def test_bad_locations_and_unportable_plans_are_refused_by_name(stored, tmp_path, save_model):
    _, _, uri = stored
    with pytest.raises(PlanError, match="plan.json is missing"):
        plan_store.read_plan("file://" + str(tmp_path))
    with pytest.raises(PlanError, match="cannot open plan"):
        plan_store.read_plan("nosuchscheme://bucket/plan")
    with pytest.raises(PlanError, match="not a stage 7"):
        plan_store.load_stage(uri, 7, tmp_path / "cache")
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / "plan.json").write_text("{not json")
    with pytest.raises(PlanError, match="not JSON"):
        plan_store.read_plan("file://" + str(tmp_path / "junk"))
    assert plan_store.is_uri("s3://bucket/plan") and not plan_store.is_uri("plans/p1")
    assert plan_store.merged([(10, 5), (0, 4), (15, 1), (40, 2)], 0) == [(0, 4), (10, 6), (40, 2)]
    assert plan_store._missing([(0, 100)], [(10, 20), (50, 10)]) == [(0, 10), (30, 20), (60, 40)]


@pytest.mark.usefixtures("ray_session")
def test_a_pipeline_runs_a_plan_given_by_uri(stored):
    from onnxshard.distributed import Pipeline

    path, plan, uri = stored
    batches = [tools.random_feeds(plan.inputs, dims={"batch": 3, "seq": 6}, seed=i) for i in range(6)]
    with Pipeline(uri, cpus_per_stage=0.5, micro_batch_size=1) as pipe:
        assert pipe.plan.uri == uri and pipe.plan.root is None
        for feeds, got in zip(batches, pipe.stream(batches)):
            assert tools.max_differences(tools.run_model(path, feeds), got) == {"y": 0.0}
        assert {c.stage for c in pipe.stats.calls} == {0, 1, 2}
