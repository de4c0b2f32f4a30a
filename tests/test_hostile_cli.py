"""The CLI against a hostile new user: every case runs `onnxshard` as a subprocess and must end in exit code 2
with one line on stderr that names the thing at fault, no traceback, the user's files intact, nothing
half-written and no process left behind. (Issue 21's groups; the Python API's cases are at the end.)"""

import json
import os
import signal
import stat
import subprocess
import sys
import time
import uuid
from pathlib import Path

import numpy as np
import psutil
import pytest
import zoo
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import onnxshard
from onnxshard import PlanError
from onnxshard.files import atomic_writer, load_npz, save_npz
from onnxshard.partitioner.out import foreign_files

CLI = [sys.executable, "-m", "onnxshard.cli"]
ENV = {**os.environ, "RAY_AUTH_MODE": "disabled", "PYTHONWARNINGS": "ignore"}


def cli(*args, cwd=None, timeout=120, env=None):
    return subprocess.run([*CLI, *map(str, args)], capture_output=True, text=True, timeout=timeout, cwd=cwd,
                          env=env or ENV)


def refused(run, *words):
    """Exit 2, exactly one line on stderr, no traceback, and the line names each of ``words``."""
    lines = run.stderr.strip().splitlines()
    assert run.returncode == 2, (run.returncode, run.stdout, run.stderr)
    assert len(lines) == 1 and "Traceback" not in run.stderr, run.stderr
    assert lines[0].startswith("onnxshard: error: "), lines[0]
    for word in words:
        assert word in lines[0], (word, lines[0])
    return lines[0]


def snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def chain(tmp_path_factory):
    """A small MatMul chain with external weights, its plan, and good inputs."""
    tmp = tmp_path_factory.mktemp("chain")
    model = zoo.save(zoo.mlp(layers=4, width=64), tmp / "model", external=True)
    plan = tmp / "plan"
    onnxshard.plan(model, plan, stages=2)
    np.savez(tmp / "in.npz", x=np.random.default_rng(0).standard_normal((4, 64)).astype(np.float32))
    return model, plan, tmp / "in.npz"


# -- 1. plan --out never removes what onnxshard did not write ---------------------------------------------------
def test_a_folder_with_a_foreign_plan_json_is_not_replaced(chain, tmp_path):
    proj = tmp_path / "proj"
    (proj / "src").mkdir(parents=True)
    (proj / "plan.json").write_text('{"name": "my-app"}')
    (proj / "thesis.tex").write_text("x")
    (proj / "src" / "main.py").write_text("print(1)")
    before = snapshot(proj)
    refused(cli("plan", chain[0], "--out", proj, "--stages", "2"), str(proj), "not a plan folder")
    assert snapshot(proj) == before


def test_an_old_plan_holding_a_users_notes_is_not_replaced(chain, tmp_path):
    old = tmp_path / "old"
    onnxshard.plan(chain[0], old, stages=3)
    (old / "NOTES.md").write_text("my notes")
    before = snapshot(old)
    refused(cli("plan", chain[0], "--out", old, "--stages", "2"), "NOTES.md", "did not write")
    assert snapshot(old) == before


def test_out_dot_inside_the_models_folder_is_refused(chain, tmp_path):
    folder = tmp_path / "work"
    folder.mkdir()
    model = zoo.save(zoo.mlp(layers=2), folder / "m")
    onnxshard.plan(model, model.parent / "plan", stages=2)
    before = snapshot(folder)
    refused(cli("plan", "model.onnx", "--out", ".", "--stages", "2", cwd=model.parent), "holds")
    refused(cli("plan", model, "--out", model.parent, "--stages", "2"), "holds", str(model))
    assert snapshot(folder) == before


def test_out_is_a_file_or_unwritable(chain, tmp_path):
    (tmp_path / "f").write_text("keep")
    refused(cli("plan", chain[0], "--out", tmp_path / "f", "--stages", "2"), "is a file")
    assert (tmp_path / "f").read_text() == "keep"
    refused(cli("plan", chain[0], "--out", "/proc/x", "--stages", "2"), "/proc", "cannot create")


def test_a_new_plan_folder_gets_the_usual_permissions(chain, tmp_path):
    run = cli("plan", chain[0], "--out", tmp_path / "p", "--stages", "2")
    assert run.returncode == 0, run.stderr
    umask = os.umask(0)
    os.umask(umask)
    assert stat.S_IMODE((tmp_path / "p").stat().st_mode) == 0o777 & ~umask
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary folder left


def test_replanning_a_pure_plan_folder_replaces_it(chain, tmp_path):
    onnxshard.plan(chain[0], tmp_path / "p", stages=3)
    run = cli("plan", chain[0], "--out", tmp_path / "p", "--stages", "2")
    assert run.returncode == 0, run.stderr
    assert onnxshard.load_plan(tmp_path / "p").num_stages == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["p"]


# -- 2. output paths are checked before any work, results come before pictures ----------------------------------
def test_output_paths_are_checked_before_the_run(chain, tmp_path):
    _, plan, inputs = chain
    (tmp_path / "outdir").mkdir()
    cases = [
        (["--outputs", "/proc/o.npz"], ["--outputs", "/proc/o.npz"]),
        (["--outputs", tmp_path / "outdir"], ["--outputs", "is a folder"]),
        (["--outputs", tmp_path / "missing" / "o.npz"], ["does not exist"]),
        (["--outputs", tmp_path / "o.npz", "--timeline", tmp_path / "run.svg"], ["--timeline", ".html or .png"]),
        (["--outputs", tmp_path / "o.npz", "--timeline", tmp_path / "run.png"], ["--timeline", "matplotlib"]),
        (["--outputs", tmp_path / "o.npz", "--timeline", "/proc/run.html"], ["--timeline", "/proc"]),
    ]
    for args, words in cases:
        if "matplotlib" in words and _has_matplotlib():
            continue
        started = time.monotonic()
        line = refused(cli("run", plan, "--inputs", inputs, *args), *words)
        assert time.monotonic() - started < 30, line  # refused before Ray starts, not after the run
    assert list((tmp_path / "outdir").iterdir()) == [] and not (tmp_path / "outdir.npz").exists()
    assert not (tmp_path / "o.npz").exists()


def _has_matplotlib():
    import importlib.util

    return importlib.util.find_spec("matplotlib") is not None


# -- 3. outputs are written whole or not at all -----------------------------------------------------------------
def test_an_interrupted_write_keeps_the_old_file(tmp_path):
    target = tmp_path / "o.npz"
    save_npz(target, {"y": np.arange(4.0)})
    before = target.read_bytes()

    class Interrupt:  # np.savez writes "a" into the file, then the "Ctrl-C" arrives while it converts "b"
        def __array__(self, *a, **k):
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        save_npz(target, {"a": np.zeros(100000), "b": Interrupt()})
    assert target.read_bytes() == before
    assert np.array_equal(load_npz(target)["y"], np.arange(4.0))
    assert [p.name for p in tmp_path.iterdir()] == ["o.npz"]  # no temporary file left
    with pytest.raises(RuntimeError), atomic_writer(tmp_path / "new.txt", "w") as f:
        f.write("half")
        raise RuntimeError
    assert not (tmp_path / "new.txt").exists()


def test_outputs_go_exactly_where_asked(tmp_path):
    save_npz(tmp_path / "out", {"y": np.ones(2)})  # numpy.savez would have written out.npz
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


# -- 4. changed weights and missing digests are refused --------------------------------------------------------
def test_zeroed_weight_bytes_of_the_same_size_are_refused(chain, tmp_path):
    model = zoo.save(zoo.mlp(layers=4, width=64), tmp_path / "m", external=True)
    plan = tmp_path / "p"
    onnxshard.plan(model, plan, stages=2)
    weights = next((plan / "weights").iterdir())
    data = bytearray(weights.read_bytes())
    data[1000:4900] = bytes(3900)
    (tmp_path / "m" / weights.name).unlink()  # a copy, not the hard-linked model file
    weights.unlink()
    weights.write_bytes(bytes(data))
    refused(cli("verify", plan), str(weights), "changed after planning")
    refused(cli("run", plan, "--inputs", chain[2], "--outputs", tmp_path / "o.npz"), "changed after planning")
    assert not (tmp_path / "o.npz").exists()


def test_an_empty_stage_digest_is_refused(chain, tmp_path):
    plan = tmp_path / "p"
    onnxshard.plan(chain[0], plan, stages=2)
    data = json.loads((plan / "plan.json").read_text())
    data["stages"][1]["sha256"] = ""
    (plan / "plan.json").write_text(json.dumps(data))
    refused(cli("verify", plan), "stage 1", "no sha256")


def test_verify_weights_hashes_every_byte_of_large_files_only_when_recorded(tmp_path):
    folder = tmp_path / "m"
    model = zoo.save(zoo.mlp(layers=2, width=16), folder, external=True)
    data = folder / "model.onnx.data"
    with open(data, "ab") as f:  # a large weight file (sparse tail): sampled, not fully hashed, at plan time
        f.truncate(80 << 20)
    onnxshard.plan(model, tmp_path / "lazy", stages=2)
    onnxshard.plan(model, tmp_path / "full", stages=2, hash_weights=True)
    refused(cli("verify", tmp_path / "lazy", "--weights"), "--hash-weights")
    ok = cli("verify", tmp_path / "full", "--weights")
    assert ok.returncode == 0 and "every byte" in ok.stdout, ok.stderr
    with open(data, "r+b") as f:  # one byte in the unused sparse tail: no sample sees it, the full check does
        f.seek((40 << 20) + 12345)
        f.write(b"\1")
    assert onnxshard.load_plan(tmp_path / "full").num_stages == 2
    refused(cli("verify", tmp_path / "full", "--weights"), "changed after planning")


# -- 5. numbers that make no sense -----------------------------------------------------------------------------
@pytest.mark.parametrize("args,words", [
    (["run", "{model}", "--inputs", "{inputs}", "--outputs", "{tmp}/o.npz", "--stages", "0"], ["--stages", "'0'"]),
    (["verify", "{plan}", "--tolerance", "nan"], ["--tolerance", "'nan'"]),
    (["verify", "{plan}", "--tolerance", "-1"], ["--tolerance"]),
    (["plan", "{model}", "--out", "{tmp}/p", "--dim", "batch=-1"], ["--dim", "batch=-1"]),
    (["plan", "{model}", "--out", "{tmp}/p", "--stages", "2.5"], ["--stages", "'2.5'"]),
    (["run", "{plan}", "--inputs", "{inputs}", "--outputs", "{tmp}/o.npz", "--cpus-per-stage", "0"],
     ["--cpus-per-stage", "'0'"]),
    (["run", "{plan}", "--inputs", "{inputs}", "--outputs", "{tmp}/o.npz", "--cpus-per-stage", "-1"],
     ["--cpus-per-stage"]),
    (["run", "{plan}", "--inputs", "{inputs}", "--outputs", "{tmp}/o.npz", "--replicas", "0"], ["--replicas"]),
    (["run", "{plan}", "--inputs", "{inputs}", "--outputs", "{tmp}/o.npz", "--micro-batch-size", "-3"],
     ["--micro-batch-size"]),
    (["plan", "{tmp}", "--out", "{tmp}/p"], ["is a folder"]),
    (["plan", "{tmp}/nothing.onnx", "--out", "{tmp}/p"], ["does not exist"]),
])
def test_nonsense_options_are_refused_before_work(chain, tmp_path, args, words):
    model, plan, inputs = chain
    fill = {"model": model, "plan": plan, "inputs": inputs, "tmp": tmp_path}
    refused(cli(*[a.format(**fill) for a in args]), *words)
    assert not (tmp_path / "p").exists() and not (tmp_path / "o.npz").exists()


# -- inputs files ----------------------------------------------------------------------------------------------
def _hostile_inputs(tmp_path: Path) -> dict[str, tuple[Path, str]]:
    good = tmp_path / "good.npz"
    np.savez(good, x=np.ones((4, 64), np.float32))
    (tmp_path / "truncated.npz").write_bytes(good.read_bytes()[:200])
    (tmp_path / "empty.npz").write_bytes(b"")
    np.save(tmp_path / "one.npy", np.ones((4, 64), np.float32))
    huge = tmp_path / "huge.npz"  # a header declaring 4e9 x 32 floats (477 GiB) over a few bytes
    import zipfile

    header = "{'descr': '<f4', 'fortran_order': False, 'shape': (4000000000, 32), }"
    header += " " * (63 - (len(header) + 10) % 64) + "\n"
    with zipfile.ZipFile(huge, "w") as z:
        z.writestr("x.npy", b"\x93NUMPY\x01\x00" + len(header).to_bytes(2, "little") + header.encode() + b"\0" * 64)
    np.savez(tmp_path / "objects.npz", x=np.array([{"a": 1}], dtype=object))
    np.savez(tmp_path / "wrong_dtype.npz", x=np.ones((4, 64), np.float64))
    np.savez(tmp_path / "wrong_shape.npz", x=np.ones((4, 63), np.float32))
    np.savez(tmp_path / "wrong_name.npz", X=np.ones((4, 64), np.float32))
    return {
        "truncated": (tmp_path / "truncated.npz", "not an .npz"),
        "empty": (tmp_path / "empty.npz", "is empty"),
        "npy": (tmp_path / "one.npy", "single .npy"),
        "huge header": (huge, "truncated or corrupt"),
        "object array": (tmp_path / "objects.npz", "Python objects"),
        "missing": (tmp_path / "nope.npz", "does not exist"),
        "folder": (tmp_path, "is a folder"),
        "wrong dtype": (tmp_path / "wrong_dtype.npz", "float64"),
        "wrong shape": (tmp_path / "wrong_shape.npz", "'x'"),
        "wrong name": (tmp_path / "wrong_name.npz", "'x'"),
    }


def test_hostile_inputs_files_are_refused_before_ray_starts(chain, tmp_path):
    _, plan, _ = chain
    for name, (path, words) in _hostile_inputs(tmp_path).items():
        started = time.monotonic()
        line = refused(cli("run", plan, "--inputs", path, "--outputs", tmp_path / "o.npz"), words)
        assert time.monotonic() - started < 30, (name, line)
        assert not (tmp_path / "o.npz").exists()
    refused(cli("verify", plan, "--inputs", tmp_path / "truncated.npz"), "not an .npz")


# -- tampered plan.json ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("tamper,words", [
    (lambda d: d["stages"][0].__setitem__("inputs", "x"), ["malformed"]),
    (lambda d: d["stages"].insert(1, dict(d["stages"][1], index=1)), ["stage"]),
    (lambda d: d["stages"].pop(), ["no stage sends the model outputs"]),
    (lambda d: d.__setitem__("version", 1), ["version 1", "re-run"]),
    (lambda d: d["weights"].__setitem__("sample", {}), ["no digest"]),
])
def test_tampered_plan_json_is_refused(chain, tmp_path, tamper, words):
    plan = tmp_path / "p"
    onnxshard.plan(chain[0], plan, stages=3)
    data = json.loads((plan / "plan.json").read_text())
    tamper(data)
    (plan / "plan.json").write_text(json.dumps(data))
    refused(cli("verify", plan), *words)


# -- 6-8. the cluster: bounded waits, clean interrupts ----------------------------------------------------------
def test_an_address_where_nothing_listens_fails_fast_naming_it(chain, tmp_path):
    _, plan, inputs = chain
    started = time.monotonic()
    refused(cli("run", plan, "--inputs", inputs, "--outputs", tmp_path / "o.npz", "--address", "127.0.0.1:1"),
            "127.0.0.1:1", "no Ray cluster answers")
    env = {**ENV, "RAY_ADDRESS": "127.0.0.1:1"}
    refused(cli("run", plan, "--inputs", inputs, "--outputs", tmp_path / "o.npz", env=env), "127.0.0.1:1")
    assert time.monotonic() - started < 60


def _marked_env():
    mark = uuid.uuid4().hex
    return {**ENV, "ONNXSHARD_TEST_MARK": mark}, mark


def _marked_processes(mark: str) -> list[psutil.Process]:
    found = []
    for proc in psutil.process_iter():
        try:
            if proc.environ().get("ONNXSHARD_TEST_MARK") == mark:
                found.append(proc)
        except (psutil.Error, OSError):
            pass
    return found


def _none_left(mark: str, grace_s: float = 15.0) -> list[str]:
    end = time.monotonic() + grace_s
    while time.monotonic() < end:
        left = _marked_processes(mark)
        if not left:
            return []
        time.sleep(0.5)
    return [" ".join(p.cmdline()[:3]) for p in _marked_processes(mark)]


def test_more_stages_than_cpus_is_refused_at_once(chain, tmp_path):
    model, _, inputs = chain
    plan = tmp_path / "p3"
    onnxshard.plan(model, plan, stages=3)
    env, mark = _marked_env()
    cpus = os.cpu_count()
    run = cli("run", plan, "--inputs", inputs, "--outputs", tmp_path / "o.npz", "--cpus-per-stage", cpus, env=env)
    refused(run, "can never place", f"CPU: need {3 * cpus}, cluster has {cpus}")
    assert _none_left(mark) == []


def _links_folders() -> set[str]:
    import tempfile

    return {p.name for p in Path(tempfile.gettempdir()).glob("onnxshard-*")}


def test_ctrl_c_during_ray_start_up_leaves_no_process(chain, tmp_path):
    _, plan, inputs = chain
    env, mark = _marked_env()
    proc = subprocess.Popen([*CLI, "run", str(plan), "--inputs", str(inputs), "--outputs", str(tmp_path / "o.npz")],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    # wait until Ray's own processes exist (start-up is under way), then interrupt
    end = time.monotonic() + 30
    while time.monotonic() < end and not any("gcs_server" in " ".join(p.cmdline()) for p in _marked_processes(mark)
                                             if p.pid != proc.pid):
        time.sleep(0.05)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode in (130, 2), err
    assert "Traceback" not in err
    assert _none_left(mark) == []
    assert not (tmp_path / "o.npz").exists()


def _as_from_a_terminal():
    """In the child, before exec: SIGINT as a shell leaves it (default, unblocked), whatever this test process
    inherited or set (an ignored SIGINT is inherited across exec, and Python then installs no handler)."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT})


def test_ctrl_c_to_the_process_group_mid_run_leaves_no_socket_folder(tmp_path):
    model = zoo.save(zoo.mlp(layers=6, width=256), tmp_path / "m")
    np.savez(tmp_path / "in.npz", x=np.ones((20000, 256), np.float32))
    before = _links_folders()
    env, mark = _marked_env()
    proc = subprocess.Popen([*CLI, "run", str(model), "--inputs", str(tmp_path / "in.npz"), "--outputs",
                             str(tmp_path / "o.npz"), "--micro-batch-size", "8", "--cpus-per-stage", "0.5"],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True, preexec_fn=_as_from_a_terminal)
    end = time.monotonic() + 90
    while time.monotonic() < end and not [n for n in _links_folders() - before if n.startswith("onnxshard-links-")]:
        time.sleep(0.05)
    assert proc.poll() is None, proc.communicate()[1]  # linked, and still running
    linked = time.monotonic()
    os.killpg(proc.pid, signal.SIGINT)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode != 0 and "Traceback" not in err, \
        f"rc {proc.returncode} {time.monotonic() - linked:.1f} s after the interrupt; the test process's SIGINT " \
        f"handler {signal.getsignal(signal.SIGINT)}\n{out}\n{err}"
    assert _links_folders() - before == set()
    assert not (tmp_path / "o.npz").exists()
    _none_left(mark)  # let Ray's processes go before the next test


# -- the Python API --------------------------------------------------------------------------------------------
def test_plan_arguments_of_the_wrong_type_are_plan_errors(chain, tmp_path):
    model = chain[0]
    for kwargs, words in [({"stages": 2.5}, "stages"), ({"stages": "2"}, "stages"), ({"stages": True}, "stages"),
                          ({"dims": {"batch": -1}}, "dims"), ({"tensor_parallel": 0}, "tensor_parallel")]:
        with pytest.raises(PlanError, match=words):
            onnxshard.plan(model, tmp_path / "p", **kwargs)
    with pytest.raises(PlanError, match="path of an .onnx file"):
        onnxshard.plan(None, tmp_path / "p")
    with pytest.raises(PlanError, match="is a folder"):
        onnxshard.plan(tmp_path, tmp_path / "p")
    with pytest.raises(PlanError, match="--cut 'h9'"):  # a string is one name, not its characters ('h', '9')
        onnxshard.plan(model, tmp_path / "p", cuts="h9")
    with pytest.raises(PlanError, match="tolerance"):
        onnxshard.verify(chain[1], tolerance=float("nan"))
    assert not (tmp_path / "p").exists()
    assert onnxshard.plan(model, tmp_path / "p", cuts="h1").num_stages == 2


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def _out_choices(data, model, root, outcomes):
    """One random folder tree of user files (some of them plans, some with stray files) and one --out choice."""
    import shutil

    shutil.rmtree(root, ignore_errors=True)
    root.mkdir()
    names = ["a", "b", "proj", "plan"]
    for name in data.draw(st.lists(st.sampled_from(names), unique=True, max_size=4)):
        kind = data.draw(st.sampled_from(["files", "plan", "plan+stray", "foreign plan.json", "empty"]))
        folder = root / name
        if kind.startswith("plan"):
            onnxshard.plan(model, folder, stages=data.draw(st.integers(1, 3)))
            if kind == "plan+stray":
                stray = folder / data.draw(st.sampled_from(["NOTES.md", "weights/extra.bin", "sub/x"]))
                stray.parent.mkdir(exist_ok=True)
                stray.write_text("mine")
        else:
            folder.mkdir()
            if kind == "files":
                (folder / "thesis.tex").write_text("x")
                (folder / "sub").mkdir()
                (folder / "sub" / "y").write_text("y")
            elif kind == "foreign plan.json":
                (folder / "plan.json").write_text('{"name": "app"}')
    user = snapshot(root)
    plans_before = {p.parent for p in root.rglob("plan.json") if foreign_files(p.parent) == []}
    out = root / data.draw(st.sampled_from([*names, "new", "a/deeper", "proj/sub"]))
    try:
        onnxshard.plan(model, out, stages=2)
        outcomes.add("planned")
    except PlanError:
        outcomes.add("refused")
    after = snapshot(root)
    for rel, content in user.items():
        owner = next((p for p in plans_before if (root / rel).is_relative_to(p)), None)
        if owner is not None and owner == out:
            continue  # a pure old plan at --out may be replaced
        assert after.get(rel) == content, rel


def test_no_out_choice_removes_a_file_onnxshard_did_not_write(tmp_path):
    model = zoo.save(zoo.mlp(layers=3), tmp_path / "m")
    outcomes: set[str] = set()
    _out_choices(model=model, root=tmp_path / "tree", outcomes=outcomes)
    assert outcomes == {"planned", "refused"}  # both branches ran


def test_long_messages_are_one_line_and_verbose_shows_the_rest(monkeypatch, capsys):
    from onnxshard import ModelError, cli

    def fails(args):
        raise ModelError("ONNX Runtime cannot load x.onnx: [ONNXRuntimeError] : 1 : FAIL\nStatus Message: detail\n"
                         "more detail")

    monkeypatch.setattr(cli, "cmd_verify", fails)
    assert cli.main(["verify", "x.onnx"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["onnxshard: error: ONNX Runtime cannot load x.onnx: [ONNXRuntimeError] : 1 : FAIL (--verbose for "
                   "details)"]
    assert cli.main(["verify", "x.onnx", "--verbose"]) == 2
    assert "more detail" in capsys.readouterr().err

    def bug(args):
        raise KeyError("a bug")

    monkeypatch.setattr(cli, "cmd_verify", bug)
    assert cli.main(["verify", "x.onnx"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "internal error" in err[0] and "KeyError" in err[0]
    assert cli.main(["--verbose", "verify", "x.onnx"]) == 2
    assert "Traceback" in capsys.readouterr().err


@pytest.mark.parametrize("case", ["no target", "bad size", "key unset", "port", "stray folder", "bad serve.json"])
def test_serve_refuses_what_it_cannot_serve_before_ray_starts(tmp_path, case):
    repo = tmp_path / "repo"
    zoo.save(zoo.mlp(), repo / "mlp")
    args, words = {
        "no target": ([tmp_path / "nothing"], ["nothing", "neither a plan folder"]),
        "bad size": ([repo, "--max-body-size", "12XB"], ["max-body-size", "12XB"]),
        "key unset": ([repo, "--api-key-env", "ONNXSHARD_NO_SUCH_VAR"], ["ONNXSHARD_NO_SUCH_VAR", "unset"]),
        "port": ([repo, "--grpc-port", "70000"], ["--grpc-port"]),
        "stray folder": ([repo], ["stray/", "no plan.json"]),
        "bad serve.json": ([repo], ["serve.json", "max_batch"]),
    }[case]
    if case == "stray folder":
        (repo / "stray").mkdir()
    if case == "bad serve.json":
        (repo / "mlp" / "serve.json").write_text('{"max_batch": 4}')
    started = time.monotonic()
    refused(cli("serve", *args), *words)
    assert time.monotonic() - started < 30  # refused before any Ray or Serve start
