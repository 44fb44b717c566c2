"""Put the repo root on sys.path so tests import the method files (`import byol`) and `common`.

Tests run their tiny models on one intra-op thread: at these sizes a second thread mostly spin-waits
(oneDNN), and on the 2-core CI machine the launched torchrun workers need the other core. A test
that trains at full size (the README's default run) is marked `all_threads` and keeps torch's
default thread count.

Tests run as on a CPU without native bf16, so --precision auto is fp32 on every test machine and the
numbers recomputed by hand stay float32; a test of the detection sets the two probes itself.
"""
import os
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

DEFAULT_THREADS = torch.get_num_threads()


def pytest_configure(config):
    config.addinivalue_line("markers",
                            "all_threads: run with torch's default intra-op thread count")


@pytest.fixture(autouse=True)
def intra_op_threads(request):
    torch.set_num_threads(DEFAULT_THREADS if request.node.get_closest_marker("all_threads") else 1)
    yield
    torch.set_num_threads(DEFAULT_THREADS)


@pytest.fixture(autouse=True)
def no_native_bf16(monkeypatch):
    for probe in ("_is_avx512_bf16_supported", "_is_amx_tile_supported"):
        monkeypatch.setattr(torch.cpu, probe, lambda: False, raising=False)
