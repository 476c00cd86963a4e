import os

import pytest
from hypothesis import HealthCheck, settings

from unmask import native
from tests.helpers import CUDA_RUNNERS, GPU_SKIP_REASON, CudaRunner

# Hypothesis: a fixed budget per property keeps the suite inside CI's time; derandomised
# in CI so a red run is reproducible from its log.
settings.register_profile(
    "default", max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture]
)
settings.register_profile("ci", parent=settings.get_profile("default"), derandomize=True)
settings.load_profile("ci" if os.environ.get("CI") else "default")


def pytest_collection_modifyitems(items):
    """Cases skipped without a CUDA device (requires_gpu, the cuda_runner's "gpu" runner)
    carry the gpu marker: `pytest -m gpu` runs them alone (unmask.gpucheck's tests stage)."""
    for item in items:
        if any(mark.kwargs.get("reason") == GPU_SKIP_REASON for mark in item.iter_markers("skipif")):
            item.add_marker(pytest.mark.gpu)


@pytest.fixture(autouse=True)
def fresh_plans():
    """Each test decides its calls afresh: some stand in another CPU's facts (vendor, AMX),
    which a launch kept for a signature by an earlier test would not see (unmask.dispatch,
    plans)."""
    from unmask import dispatch

    dispatch.clear_plans()


@pytest.fixture(autouse=True)
def seeded_torch():
    """Each test draws its unseeded torch.rand* values from the same start, whatever ran
    before it: a test added earlier in the run once moved another's random ids onto a
    case its tolerance did not cover, red in CI and green here."""
    import torch

    torch.manual_seed(0)


@pytest.fixture(params=["reference", "native"])
def backend(request, monkeypatch):
    """Run a test once through the reference and once through the native kernel of the device."""
    monkeypatch.setenv("UNMASK_BACKEND", request.param)
    return request.param


@pytest.fixture(params=CUDA_RUNNERS)
def cuda_runner(request):
    """Run a CUDA kernel test on a GPU, and under the SIMT interpreter on CPU tensors."""
    return CudaRunner(request.param)


@pytest.fixture
def simt_sm_count():
    """Set the SM count the interpreted launchers see (restored after the test)."""
    previous = native._C.simt_sm_count()
    yield native._C.simt_set_sm_count
    native._C.simt_set_sm_count(previous)


@pytest.fixture(params=native.runnable_cpu_isas() or ["none"])
def cpu_isa(request):
    """Run a test under every instruction-set build of the CPU kernels this CPU runs."""
    if request.param == "none":
        pytest.skip("unmask._C not built")
    with native.cpu_isa_forced(request.param):
        yield request.param
