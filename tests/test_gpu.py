"""On a GPU (``pytest -m gpu``): stage workers on the CUDA execution provider, sharing one GPU through fractional
``num_gpus``, give what ONNX Runtime CUDA gives on the whole model. Skipped where onnxruntime has no CUDA provider or
Ray sees no GPU, so the suite never needs one."""

import numpy as np
import onnxruntime as ort
import pytest

import onnxshard
from onnxshard import decoder_models as dm
from onnxshard.distributed.generator import Generator
from onnxshard.distributed.microbatch import infer_batch_axes, run_per_micro_batch
from onnxshard.runtime import RuntimeConfig
from onnxshard.runtime.tools import model_runner
from onnxshard.sampling import SamplingParams

CUDA = "CUDAExecutionProvider"
pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(CUDA not in ort.get_available_providers(),
                                 reason="onnxruntime has no CUDAExecutionProvider (install onnxruntime-gpu)")]


@pytest.fixture
def gpu_ray(ray_session):
    if ray_session.cluster_resources().get("GPU", 0) < 1:
        pytest.skip("Ray sees no GPU")
    return ray_session


def test_two_stages_share_one_gpu_and_equal_onnxruntime_cuda(gpu_ray, tmp_path):
    """The reference runs the same micro-batches: ORT CUDA computes MatMuls in TF32 by default, and cuBLAS picks its
    kernels by shape, so the whole batch at once rounds differently (ORT CUDA alone, 12 layers: 128 apart on outputs
    that reach 887; `benchmarks/RESULTS.md`)."""
    model = onnxshard.models.save(onnxshard.models.transformer(layers=4, d=128, heads=4, ffn=256),
                                  tmp_path / "model", external=True)
    plan = onnxshard.plan(model, tmp_path / "plan", stages=2)
    rng = np.random.default_rng(0)
    feeds = {"x": rng.standard_normal((8, 16, 128)).astype(np.float32), "mask": np.ones((8, 16), np.float32)}
    cuda = RuntimeConfig(provider="cuda")
    expected = run_per_micro_batch(model_runner(model, cuda), feeds, infer_batch_axes(plan), 2)["y"]
    with onnxshard.Pipeline(plan, gpus_per_stage=0.5, cpus_per_stage=1, runtime=cuda, micro_batch_size=2) as pipe:
        providers = [ranks[0]["providers"][0] for ranks in pipe.worker_info[0]]
        got = pipe.run(feeds)
        streamed = list(pipe.stream([feeds] * 3))
    assert providers == [CUDA, CUDA]
    scale = float(np.abs(expected).max())
    for out in [got, *streamed]:
        np.testing.assert_allclose(out["y"], expected, rtol=1e-3, atol=1e-3 * scale)


def test_generation_on_cuda_stages_gives_onnxruntime_cuda_greedy_tokens(gpu_ray, tmp_path):
    from test_generation import ort_greedy

    model = onnxshard.models.save(dm.llama_cached(layers=3), tmp_path / "model", external=True)
    plan = onnxshard.plan(model, tmp_path / "plan", stages=2)
    rng = np.random.default_rng(0)
    prompts = [rng.integers(0, 512, 2 + 3 * i).tolist() for i in range(4)]
    with Generator(plan, gpus_per_stage=0.5, cpus_per_stage=1, runtime=RuntimeConfig(provider="cuda")) as gen:
        got = gen.generate(prompts, SamplingParams(max_tokens=6))
    assert got == [ort_greedy(model, p, 6, provider=CUDA) for p in prompts]
