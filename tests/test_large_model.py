"""A model with more than 2 GB of external weights (a sparse file) plans lazily: low RSS, no weight bytes read."""

import json
import subprocess
import sys
import textwrap

import numpy as np
import onnx
from onnx import TensorProto as T
from onnx import helper as h

from onnxshard.runtime import RuntimeConfig, tools

WIDE, NARROW, LAYERS = 16384, 4096, 10  # 10 weights of 256 MiB: 2.5 GiB
ALIGN = 1 << 16


def _big_model(folder):
    folder.mkdir()
    nodes, inits, x, offset = [], [], "x", 0
    for i in range(LAYERS):
        shape = (NARROW, WIDE) if i % 2 == 0 else (WIDE, NARROW)
        length = shape[0] * shape[1] * 4
        t = onnx.TensorProto(name=f"W{i}", data_type=T.FLOAT, dims=shape, data_location=T.EXTERNAL)
        for k, v in (("location", "weights.bin"), ("offset", str(offset)), ("length", str(length))):
            t.external_data.add(key=k, value=v)
        inits.append(t)
        nodes.append(h.make_node("MatMul", [x, f"W{i}"], [f"h{i}"]))
        x = f"h{i}"
        offset += -(-length // ALIGN) * ALIGN
    with open(folder / "weights.bin", "wb") as f:
        f.truncate(offset)  # sparse: no bytes on disk, reads return zeros
    graph = h.make_graph(nodes, "big", [h.make_tensor_value_info("x", T.FLOAT, ["batch", NARROW])],
                         [h.make_tensor_value_info(x, T.FLOAT, ["batch", NARROW])], inits)
    model = h.make_model(graph, opset_imports=[h.make_opsetid("", 17)])
    onnx.save(model, str(folder / "model.onnx"))
    return folder / "model.onnx", offset


PLANNER = textwrap.dedent("""
    import json, sys, time
    def proc(file, key):  # VmHWM, not ru_maxrss: that one keeps the forking parent's peak across exec
        return int(next(l for l in open(file) if l.startswith(key)).split()[1])
    def rchar():
        return proc("/proc/self/io", "rchar")
    import onnxshard
    before, t0 = rchar(), time.perf_counter()
    plan = onnxshard.plan(sys.argv[1], sys.argv[2], stages=4)
    seconds, read = time.perf_counter() - t0, rchar() - before
    print(json.dumps({"seconds": seconds, "read": read, "stages": plan.num_stages, "mode": plan.weights.mode,
                      "peak_rss": proc("/proc/self/status", "VmHWM:") * 1024}))
""")


def test_plan_2_5_gb_model_lazily_and_run_its_shards(tmp_path):
    model, weight_bytes = _big_model(tmp_path / "model")
    assert weight_bytes > 2 * 2**30
    run = subprocess.run([sys.executable, "-c", PLANNER, str(model), str(tmp_path / "plan")],
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    stats = json.loads(run.stdout.strip().splitlines()[-1])
    print("big-model planning:", stats)
    assert stats["stages"] == 4 and stats["mode"] == "link"
    assert stats["peak_rss"] < 300 * 2**20
    assert stats["read"] < 8 * 2**20  # model.onnx and stage files only, not the 2.5 GiB of weights

    plan = __import__("onnxshard").load_plan(tmp_path / "plan")
    config = RuntimeConfig(intra_op_threads=1, prepacking=False)
    sessions = tools.stage_sessions(plan, config)
    feeds = {"x": np.ones((1, NARROW), np.float32)}
    out = tools.run_stages(plan, feeds, sessions)
    assert out[plan.outputs[0].name].shape == (1, NARROW)
    assert not out[plan.outputs[0].name].any()  # the sparse weights read as zeros
