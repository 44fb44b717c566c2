"""Put the repo root on sys.path so tests import the method files (`import byol`) and `common`.

Tests run their tiny models on one intra-op thread: at these sizes a second thread mostly spin-waits
(oneDNN), and on the 2-core CI machine the launched torchrun workers need the other core.

The README's default run (`python byol.py`, about 6 minutes on one thread) is the one full-size
training in the suite. A test that needs it is marked `default_run` and takes the `default_run`
fixture: the run starts as a one-thread subprocess as soon as the tests are collected, the other
tests run beside it on the other core, and the marked tests are moved to the end, where they wait
for it.

Tests run as on a CPU without native bf16, so --precision auto is fp32 in every test process and the
numbers recomputed by hand stay float32; a test of the detection sets the two probes itself.
"""
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

DEFAULT_THREADS = torch.get_num_threads()


DEFAULT_RUN_ARGS = ["--device", "cpu", "--knn-every", "6"]  # kNN at init and at the end only
_default_run = {}  # "process", "out": the background `python byol.py`, once started


def pytest_configure(config):
    config.addinivalue_line("markers", "default_run: reads the README's default run of byol.py "
                            "(the `default_run` fixture); runs after every other test")


def pytest_collection_modifyitems(config, items):
    waiting = [item for item in items if item.get_closest_marker("default_run")]
    if not waiting:
        return
    items[:] = [item for item in items if item not in waiting] + waiting
    out = Path(tempfile.mkdtemp(prefix="default_run_"))
    env = dict(os.environ, OMP_NUM_THREADS="1")
    with open(out / "log", "w") as log:
        _default_run["process"] = subprocess.Popen(
            [sys.executable, "byol.py", "--out", str(out), *DEFAULT_RUN_ARGS], cwd=ROOT, env=env,
            stdout=log, stderr=subprocess.STDOUT)
    _default_run["out"] = out


def pytest_unconfigure(config):
    process = _default_run.get("process")
    if process is not None:
        if process.poll() is None:
            process.kill()
            process.wait()
        shutil.rmtree(_default_run["out"], ignore_errors=True)


@pytest.fixture
def default_run():
    """The output folder of the finished background `python byol.py` (metrics.jsonl, last.pt)."""
    process, out = _default_run["process"], _default_run["out"]
    code = process.wait(timeout=1800)
    assert code == 0, (out / "log").read_text()[-3000:]
    return out


@pytest.fixture(autouse=True)
def intra_op_threads():
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(DEFAULT_THREADS)


@pytest.fixture(autouse=True, scope="session")
def no_native_bf16():
    """Session-wide, so that the training runs of class-scoped fixtures see it too. Subprocesses
    (CLI runs, torchrun launches, the default run) see the real CPU."""
    patch = pytest.MonkeyPatch()
    for probe in ("_is_avx512_bf16_supported", "_is_amx_tile_supported"):
        patch.setattr(torch.cpu, probe, lambda: False, raising=False)
    yield
    patch.undo()
