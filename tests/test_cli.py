"""The CLI on the zoo: plan, inspect, verify (exit 1 on mismatch)."""

import json

import numpy as np
import onnx
import zoo

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


def test_plan_json_round_trips_through_the_cli(save_model, tmp_path):
    assert main(["plan", str(save_model(zoo.cnn())), "--out", str(tmp_path / "p"), "--stages", "3"]) == 0
    data = json.loads((tmp_path / "p" / "plan.json").read_text())
    assert len(data["stages"]) == 3
