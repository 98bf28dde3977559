import os

# Set before anything imports transformers or triton: tests never touch a hub, and Triton kernels
# run through the interpreter on CPU-only machines.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
# Cost profiles measured by tests (under test load) never land in the user's cache.
if "C2T_FAST_COST_DIR" not in os.environ:
    import tempfile

    os.environ["C2T_FAST_COST_DIR"] = tempfile.mkdtemp(prefix="c2t-fast-test-costs-")

import pytest  # noqa: E402
import torch  # noqa: E402

# Without a GPU the Triton kernels run through the interpreter; with one they compile (decided by the
# device, not by CUDA_VISIBLE_DEVICES, which a GPU machine need not set). Set before triton is imported.
if "TRITON_INTERPRET" not in os.environ and not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"


def pytest_report_header(config):
    from c2t_fast.hf.shipped import MissingModelPackage, smollm2_dir

    try:
        return f"default target: {smollm2_dir()}"
    except MissingModelPackage as err:
        return f"default target MISSING, the tests that use it will fail: {err}"


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture
def poison():
    """Fill the allocator's free memory with garbage so that an output the kernel forgets to write
    shows up as wrong values rather than as lucky zeros."""

    def run(device: str, nbytes: int = 1 << 22):
        junk = torch.full((nbytes // 8,), -7777777, dtype=torch.int64, device=device)
        del junk

    return run
