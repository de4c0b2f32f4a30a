"""The CLI on the zoo: plan, inspect, verify (exit 1 on mismatch)."""

import json

import numpy as np
import onnx
import zoo

import onnxshard
from onnxshard.cli import main


def test_plan_inspect_verify_round_trip(save_model, tmp_path, capsys):
    path = save_model(zoo.transformer(layers=4), external=True)
    assert main(["plan", str(path), "--out", str(tmp_path / "p"), "--stages", "2", "--dim", "seq=8"]) == 0
    assert main(["inspect", str(tmp_path / "p")]) == 0
    out = capsys.readouterr().out
    assert "GFLOP/sample" in out and "stage 0 -> 1:" in out and "B/sample" in out
    assert main(["verify", str(tmp_path / "p")]) == 0
    assert "OK: 2 stage(s)" in capsys.readouterr().out


def test_verify_a_model_directly_with_given_inputs(save_model, tmp_path, capsys):
    path = save_model(zoo.multi_io())
    rng = np.random.default_rng(1)
    np.savez(tmp_path / "in.npz", x1=rng.standard_normal((5, 8), dtype=np.float32),
             x2=rng.standard_normal((5, 8), dtype=np.float32))
    assert main(["verify", str(path), "--stages", "4", "--inputs", str(tmp_path / "in.npz")]) == 0
    assert "OK: 4 stage(s)" in capsys.readouterr().out


def test_verify_exits_1_when_a_stage_no_longer_matches(save_model, tmp_path, capsys):
    path = save_model(zoo.mlp())
    assert main(["plan", str(path), "--out", str(tmp_path / "p"), "--stages", "2"]) == 0
    # Change the source model's weights after planning: the stages no longer reproduce it.
    model = onnx.load(str(path))
    model.graph.initializer[0].raw_data = np.ones((16, 16), np.float32).tobytes()
    onnx.save(model, str(path))
    assert main(["verify", str(tmp_path / "p")]) == 1
    assert "MISMATCH" in capsys.readouterr().out


def test_inspect_a_model_lists_cut_candidates(save_model, capsys):
    path = save_model(zoo.mlp(layers=2))
    assert main(["inspect", str(path), "--tensors"]) == 0
    out = capsys.readouterr().out
    assert "input  x: float32" in out and "h0" in out


def test_inspect_a_model_with_stages_prints_a_plan_without_writing(save_model, tmp_path, capsys):
    path = save_model(zoo.cnn())
    assert main(["inspect", str(path), "--stages", "3"]) == 0
    assert "stage 1 -> 2:" in capsys.readouterr().out
    assert not list(path.parent.glob("*plan*"))


def test_run_names_a_bottleneck_stage_and_the_command_that_replans(save_model, tmp_path, ray_session, capsys):
    path = save_model(zoo.transformer(layers=4, d=128, heads=4, ffn=512))
    onnxshard.plan(path, tmp_path / "lopsided", cuts=["l0.n1"])  # stage 0: one LayerNorm; stage 1: the rest
    rng = np.random.default_rng(0)  # big enough that stage 1's compute, not the per-call costs, is its busy time
    np.savez(tmp_path / "in.npz", x=rng.standard_normal((8, 64, 128)).astype(np.float32),
             mask=np.ones((8, 64), np.float32))
    assert main(["run", str(tmp_path / "lopsided"), "--inputs", str(tmp_path / "in.npz"), "--outputs",
                 str(tmp_path / "out.npz"), "--micro-batch-size", "2", "--cpus-per-stage", "0.5"]) == 0
    out = capsys.readouterr().out
    assert "stage 1 is the bottleneck" in out, out
    assert f"onnxshard plan {path} --out NEW_PLAN --stages 2 --profile" in out


def test_plan_and_inspect_size_costs_from_example_inputs(save_model, tmp_path, capsys):
    path = save_model(zoo.transformer(layers=2))  # x [batch, seq, 32], mask [batch, seq]
    np.savez(tmp_path / "ex.npz", x=np.zeros((2, 64, 32), np.float32), mask=np.ones((2, 64), np.float32))
    assert main(["inspect", str(path)]) == 0
    assert "seq counted as 1" in capsys.readouterr().out
    assert main(["inspect", str(path), "--inputs", str(tmp_path / "ex.npz")]) == 0
    assert "counted as 1" not in capsys.readouterr().out
    assert main(["plan", str(path), "--out", str(tmp_path / "p"), "--stages", "2", "--inputs",
                 str(tmp_path / "ex.npz")]) == 0
    assert json.loads((tmp_path / "p" / "plan.json").read_text())["cost_dims"] == {"batch": None, "seq": 64}


def test_plan_json_round_trips_through_the_cli(save_model, tmp_path):
    assert main(["plan", str(save_model(zoo.cnn())), "--out", str(tmp_path / "p"), "--stages", "3"]) == 0
    data = json.loads((tmp_path / "p" / "plan.json").read_text())
    assert len(data["stages"]) == 3


def test_run_a_model_through_the_pipeline_from_the_cli(save_model, tmp_path, ray_session, capsys):
    path = save_model(zoo.transformer(layers=2))
    rng = np.random.default_rng(0)
    feeds = {"x": rng.standard_normal((5, 4, 32)).astype(np.float32), "mask": np.ones((5, 4), np.float32)}
    np.savez(tmp_path / "in.npz", **feeds)
    code = main(["run", str(path), "--inputs", str(tmp_path / "in.npz"), "--outputs", str(tmp_path / "out.npz"),
                 "--stages", "2", "--micro-batch-size", "2", "--cpus-per-stage", "0.5",
                 "--timeline", str(tmp_path / "run.html")])
    assert code == 0
    out = capsys.readouterr().out
    assert "3 micro-batches" in out
    # planned at the inputs' sizes: the table says nothing was counted as 1 (it would without them)
    assert onnxshard.plan(path, tmp_path / "plain", stages=2).unsized_dims and "counted as 1" not in out
    page = (tmp_path / "run.html").read_text()
    assert page.count("<rect") == 6 and "GPipe bound" in page  # 3 micro-batches x 2 stages
    trace = json.loads((tmp_path / "run.trace.json").read_text())
    assert sum(e["ph"] == "X" for e in trace["traceEvents"]) == 6
    from onnxshard.runtime import tools

    with np.load(tmp_path / "out.npz") as out:
        np.testing.assert_array_equal(out["y"], tools.run_model(path, feeds)["y"])


def test_demo_runs_and_checks_itself(ray_session, capsys):
    from onnxshard.demo import run_demo

    assert run_demo(stages=2, batch=4, seq=8, layers=2, micro_batch_size=2, repeats=1) == 0
    out = capsys.readouterr().out
    assert "-> OK" in out and "samples/s" in out


def test_bench_prints_ratios_against_ort_baselines(save_model, ray_session, capsys):
    path = save_model(zoo.mlp(layers=4, width=32))
    assert main(["bench", str(path), "--stages", "2", "--batch", "8", "--repeats", "1", "--micro-batch-size", "auto"]) == 0
    out = capsys.readouterr().out
    for row in ("ORT whole model, 1 thread(s)", "ORT whole model, 2 thread(s)", "ORT 2 processes x 1 thread",
                "onnxshard 2 stages x 1 thread (direct), micro-batch auto (",
                "onnxshard 2 stages x 1 thread (direct), stream of 4 batches"):
        assert row in out
    assert "GPipe bound" in out and "stages cut by analytic cost at batch=8" in out
    assert "stream of 4 batches: " in out and "x of ORT 2 processes x 1 thread" in out  # ratios paired per round
    assert main(["bench", str(path), "--batch", "8", "--repeats", "1", "--transport", "ray", "--profile"]) == 0
    out = capsys.readouterr().out
    assert "onnxshard 2 stages x 1 thread (ray), micro-batch auto (" in out and "stages cut by profile cost" in out
