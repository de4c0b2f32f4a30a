"""Bad models and bad plan requests: a one-line error naming the problem, exit code 2, nothing left in --out."""

import onnx
import pytest
import zoo
from onnx import helper as h

from onnxshard.cli import main


def _mlp_external(save_model):
    return save_model(zoo.mlp(width=32), external=True)


def _not_onnx(save_model, tmp_path):
    path = tmp_path / "notes.onnx"
    path.write_text("this is not a model\n" * 20)
    return path


def _truncated(save_model, tmp_path):
    path = save_model(zoo.mlp(width=32))
    data = path.read_bytes()
    path.write_bytes(data[: len(data) * 2 // 3])
    return path


def _missing_weights(save_model, tmp_path):
    path = _mlp_external(save_model)
    (path.parent / "model.onnx.data").unlink()
    return path


def _short_weights(save_model, tmp_path):
    path = _mlp_external(save_model)
    data = path.parent / "model.onnx.data"
    data.write_bytes(data.read_bytes()[:100])
    return path


def _escaping_location(save_model, tmp_path):
    path = _mlp_external(save_model)
    model = onnx.load(str(path), load_external_data=False)
    (tmp_path / "secret.bin").write_bytes(b"\0" * 100000)
    for t in model.graph.initializer:
        for e in t.external_data:
            if e.key == "location":
                e.value = "../secret.bin"
    onnx.save(model, str(path))
    return path


def _unknown_op(save_model, tmp_path):
    model = zoo.mlp()
    model.graph.node[2].op_type = "Frobnicate"
    return save_model(model)


def _undeclared_domain(save_model, tmp_path):
    model = zoo.mlp()
    model.graph.node[2].domain = "org.nowhere"
    return save_model(model)


def _custom_domain(save_model, tmp_path):
    model = zoo.mlp()
    model.graph.node[2].domain = "org.custom"
    model.opset_import.append(h.make_opsetid("org.custom", 1))
    return save_model(model)


CASES = {
    "not_onnx": (_not_onnx, [], "not a readable ONNX model"),
    "truncated": (_truncated, [], "truncated"),
    "missing_weights": (_missing_weights, [], "is missing"),
    "short_weights": (_short_weights, [], "truncated or belongs to another export"),
    "escaping_location": (_escaping_location, [], "outside the model folder"),
    "unknown_op": (_unknown_op, [], "'Frobnicate', which is not in ONNX domain"),
    "undeclared_domain": (_undeclared_domain, [], "does not import"),
    "custom_domain": (_custom_domain, [], "--allow-domain org.custom"),
    "too_many_stages": (lambda s, t: s(zoo.mlp(layers=2)), ["--stages", "7"], "use --stages 6 or fewer"),
    "missing_cut": (lambda s, t: s(zoo.mlp()), ["--cut", "h_2"], "similar names: ['h2']"),
    "memory_cap": (lambda s, t: s(zoo.mlp(width=64)), ["--max-stage-memory", "1KB"], "alone holds"),
    "bad_size": (lambda s, t: s(zoo.mlp()), ["--max-stage-memory", "lots"], "cannot read 'lots' as a size"),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_bad_input_gets_one_line_error_and_no_output(case, save_model, tmp_path, capsys):
    make, extra, message = CASES[case]
    path = make(save_model, tmp_path)
    out = tmp_path / "out" / "plan"
    code = main(["plan", str(path), "--out", str(out), *extra])
    err = capsys.readouterr().err
    assert code == 2
    assert message in err, err
    assert err.count("\n") == 1 and err.startswith("onnxshard: error: ")
    assert not out.exists()
    assert not any((tmp_path / "out").iterdir()) if (tmp_path / "out").exists() else True


def test_out_folder_holding_other_files_is_refused(save_model, tmp_path, capsys):
    out = tmp_path / "busy"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    assert main(["plan", str(save_model(zoo.mlp())), "--out", str(out), "--stages", "2"]) == 2
    assert "not a plan folder" in capsys.readouterr().err
    assert (out / "keep.txt").read_text() == "mine"


def test_replanning_replaces_an_existing_plan(save_model, tmp_path, capsys):
    path = save_model(zoo.mlp())
    assert main(["plan", str(path), "--out", str(tmp_path / "p"), "--stages", "3"]) == 0
    assert main(["plan", str(path), "--out", str(tmp_path / "p"), "--stages", "2"]) == 0
    assert sorted(p.name for p in (tmp_path / "p").glob("stage*.onnx")) == ["stage0.onnx", "stage1.onnx"]


def test_allow_domain_lets_a_custom_domain_through_planning(save_model, tmp_path):
    path = _custom_domain(save_model, tmp_path)
    # Planning succeeds; ORT would need the custom-op library to type and run it, so cut where onnx can type.
    assert main(["plan", str(path), "--out", str(tmp_path / "p"), "--allow-domain", "org.custom",
                 "--cut", "a0"]) == 0
