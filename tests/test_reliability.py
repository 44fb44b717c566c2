"""Crash and resume (SIGKILL), SIGTERM checkpointing, non-finite loss, checkpoint mix-ups, bad
input, and real torchrun launches: elastic restart, two nodes, pre-emption, kill mid-save, a hung
rank."""

import importlib
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

import byol
import eval_linear
from ddp_runner import ROOT, final_state

TINY = ["--synthetic-size", "64", "--image-size", "32", "--batch-size", "8", "--hidden-dim", "64",
        "--proj-dim", "32", "--epochs", "1", "--knn-every", "0", "--log-every", "1",
        "--device", "cpu"]


def start(args):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    return subprocess.Popen([sys.executable, "byol.py", *args], cwd=ROOT, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def wait_for_step(path, step, process, timeout=120):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if path.exists():
            try:
                if torch.load(path, weights_only=True)["step"] >= step:
                    return
            except Exception:  # being replaced right now: try again
                pass
        assert process.poll() is None, process.communicate()
        time.sleep(0.2)
    raise AssertionError("no checkpoint in time")


def weights(path):
    state = torch.load(path, weights_only=True)
    return state["step"], {**state["model"],
                           **{"target." + k: v for k, v in state["target"].items()}}


def test_sigterm_saves_a_checkpoint_and_exits_nonzero(tmp_path):
    process = start(TINY + ["--out", str(tmp_path), "--ckpt-every-steps", "1",
                            "--synthetic-size", "400"])
    wait_for_step(tmp_path / "last.pt", 1, process)
    process.send_signal(signal.SIGTERM)
    _, err = process.communicate(timeout=60)
    assert process.returncode == 128 + signal.SIGTERM, err[-2000:]
    step, _ = weights(tmp_path / "last.pt")
    assert step >= 1 and not any(p.suffix == ".tmp" for p in tmp_path.iterdir())


def test_non_finite_loss_stops_and_keeps_last_good_checkpoint(tmp_path, capsys):
    byol.main(TINY + ["--out", str(tmp_path), "--stop-after", "2"])
    before = (tmp_path / "last.pt").read_bytes()
    with pytest.raises(SystemExit) as exit_info:
        byol.main(TINY + ["--out", str(tmp_path), "--resume", "--base-lr", "inf",
                          "--ckpt-every-steps", "1"])
    assert exit_info.value.code == 3
    message = capsys.readouterr().err.strip().splitlines()[-1]
    assert message.startswith("error: non-finite") and "at step" in message
    assert "last good checkpoint kept" in message
    assert (tmp_path / "last.pt").read_bytes() == before


def test_checkpoint_mix_ups_are_reported(tmp_path, capsys):
    byol.main(TINY + ["--out", str(tmp_path / "a"), "--stop-after", "1"])
    # another architecture on --resume
    with pytest.raises(SystemExit):
        byol.main(TINY + ["--out", str(tmp_path / "a"), "--resume", "--arch", "resnet50"])
    assert "checkpoint has arch='resnet18'" in capsys.readouterr().err
    # a truncated checkpoint for eval
    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes((tmp_path / "a" / "last.pt").read_bytes()[:1000])
    with pytest.raises(SystemExit):
        eval_linear.main(["--ckpt", str(truncated)])
    assert "unreadable" in capsys.readouterr().err
    # not a checkpoint of this repo
    other = tmp_path / "other.pt"
    torch.save({"state_dict": {}}, other)
    with pytest.raises(SystemExit):
        eval_linear.main(["--ckpt", str(other)])
    assert "not a checkpoint of this repo" in capsys.readouterr().err


def test_checkpoints_load_with_weights_only_and_no_eval_of_config_text():
    sources = "".join(open(os.path.join(ROOT, name)).read() for name in os.listdir(ROOT)
                      if name.endswith(".py"))
    assert "weights_only=False" not in sources
    assert "yaml.load(" not in sources and "exec(" not in sources and " eval(" not in sources


METHODS = ["byol", "ladder_byol", "dense_byol", "densesiam", "lewel", "mcl"]


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("args, message", [
    (["--batch-size", "-4"], "--batch-size must be positive"),
    (["--preset", "no-such-preset"], "unknown preset"),
    (["--resume"], "does not exist"),
    (["--data", "/no/such/folder"], "no such file or directory"),
    (["--batch-size", "1"], "--batch-size 1 leaves 1 image per process"),
])
def test_every_method_rejects_bad_input_with_one_line(tmp_path, capsys, method, args, message):
    module = __import__(method)
    with pytest.raises(SystemExit) as exit_info:
        module.main(["--out", str(tmp_path), "--device", "cpu", "--epochs", "1"] + args)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("error: ") and message in err[-1], err[-1:]


def test_batch_not_divisible_by_world_size_and_unknown_stage(capsys):
    import common

    with pytest.raises(common.InputError, match="not divisible by the world size 3"):
        common.check_common_config(byol.Config(batch_size=128), world_size=3)
    # one image per process: BatchNorm has no batch statistics to train on; 2 per process is the
    # least that works
    with pytest.raises(common.InputError,
                       match=r"--batch-size 4 leaves 1 image per process .* use --batch-size 8"):
        common.check_common_config(byol.Config(batch_size=4), world_size=4)
    common.check_common_config(byol.Config(batch_size=8), world_size=4)
    with pytest.raises(SystemExit):
        eval_linear.main(["--ckpt", "x.pt", "--stage", "res6", "--device", "cpu"])
    assert "--stage 'res6' is not one of res2, res3, res4, res5" in capsys.readouterr().err


def test_images_smaller_than_the_crop_are_upscaled(tmp_path):
    from PIL import Image

    for split in ("train", "val"):
        for cls in ("a", "b"):
            (tmp_path / split / cls).mkdir(parents=True)
            for i in range(4):
                Image.new("RGB", (6, 5), (i * 60, 30, 90)).save(tmp_path / split / cls / f"{i}.png")
    result = byol.main(TINY + ["--data", str(tmp_path), "--workers", "0",
                               "--out", str(tmp_path / "out"), "--stop-after", "1"])
    assert result["step"] == 1


def test_elastic_restart_resumes_by_itself(tmp_path, monkeypatch):
    import common

    cfg = byol.Config(out=str(tmp_path))
    monkeypatch.setenv("TORCHELASTIC_RESTART_COUNT", "0")
    assert not common.should_resume(cfg)
    monkeypatch.setenv("TORCHELASTIC_RESTART_COUNT", "1")
    assert not common.should_resume(cfg)  # restarted before any checkpoint: start over
    byol.main(TINY + ["--out", str(tmp_path), "--stop-after", "2"])
    assert common.should_resume(cfg)
    result = byol.main(TINY + ["--out", str(tmp_path)])  # no --resume flag: continues from step 2
    assert result["step"] == 8


# --------------------------------------------------------------------------------------------------
# Real launches: `python -m torch.distributed.run` with 2 CPU processes (gloo, 1 thread each), tiny
# runs of 6 steps, faults injected from outside (SIGKILL of a worker, SIGTERM to the launcher) or
# by a driver script around the method's main().
# --------------------------------------------------------------------------------------------------

SMALL = ["--synthetic-size", "48", "--batch-size", "8", "--epochs", "1", "--knn-every", "0",
         "--log-every", "1", "--device", "cpu", "--ckpt-every-steps", "3"]
# 48 images at global batch 8 (4 per process): 6 steps, last.pt after steps 3 and 6
LAUNCH = ["byol.py", *SMALL, "--image-size", "32", "--hidden-dim", "64", "--proj-dim", "32"]
STEPS = 6
TWO_PROCESSES = ["--standalone", "--nproc_per_node=2"]


def torchrun(launch_args, script_args, log, extra_env=None):
    """Start torchrun in a session of its own, output to `log`."""
    env = dict(os.environ, OMP_NUM_THREADS="1", **(extra_env or {}))
    command = [sys.executable, "-m", "torch.distributed.run", *launch_args, *script_args]
    with open(log, "w") as stream:
        return subprocess.Popen(command, cwd=ROOT, env=env, stdout=stream, stderr=subprocess.STDOUT,
                                start_new_session=True)


def finish(process, timeout):
    """Exit code of a launch (None if it still runs after `timeout` s); then kill what is left of
    it, so that no worker outlives the test (torchrun starts each worker in a session of its
    own)."""
    try:
        return process.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        return None
    finally:
        for session in [*worker_pids(process.pid).values(), process.pid]:
            try:
                os.killpg(session, signal.SIGKILL)
            except ProcessLookupError:
                pass


def wait_for_file(path, process, timeout=120):
    """Wait until `path` exists (the first last.pt: step 3) while `process` runs."""
    deadline = time.time() + timeout
    while not path.exists():
        assert process.poll() is None, f"exit code {process.poll()} before {path.name} appeared"
        assert time.time() < deadline, f"no {path.name} after {timeout} s"
        time.sleep(0.05)


def worker_pids(agent_pid):
    """{LOCAL_RANK: pid} of the workers a torchrun agent started (its child processes)."""
    pids = {}
    for entry in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{entry}/stat") as stat:
                parent = int(stat.read().rsplit(")", 1)[1].split()[1])
            if parent == agent_pid:
                with open(f"/proc/{entry}/environ", "rb") as environ:
                    variables = dict(item.split(b"=", 1) for item in environ.read().split(b"\0")
                                     if b"=" in item)
                pids[int(variables[b"LOCAL_RANK"])] = int(entry)
        except (OSError, KeyError, IndexError):
            pass
    return pids


def assert_same_state(a, b):
    (step_a, tensors_a), (step_b, tensors_b) = a, b
    assert step_a == step_b == STEPS
    assert tensors_a.keys() == tensors_b.keys()
    for name in tensors_a:
        assert torch.equal(tensors_a[name], tensors_b[name]), name


@pytest.fixture(scope="module")
def straight(tmp_path_factory):
    """Final state of an uninterrupted 2-process launch (launched once per module)."""
    out = tmp_path_factory.mktemp("straight")
    process = torchrun(TWO_PROCESSES, LAUNCH + ["--out", str(out)], out / "log")
    assert finish(process, 240) == 0, (out / "log").read_text()[-3000:]
    return final_state(out / "last.pt")


def test_elastic_restart_after_sigkill_of_one_worker_matches_an_uninterrupted_run(
        tmp_path, straight):
    # README: under `torchrun --max-restarts N` a restarted worker continues from last.pt by itself.
    # (LEWEL_M's key queue across a resume: tests/test_lewel.py)
    log = tmp_path / "log"
    command = LAUNCH + ["--out", str(tmp_path)]
    process = torchrun(TWO_PROCESSES + ["--max-restarts=1"], command, log)
    wait_for_file(tmp_path / "last.pt", process)
    os.kill(worker_pids(process.pid)[1], signal.SIGKILL)
    assert finish(process, 240) == 0, log.read_text()[-4000:]
    resumed = [line for line in log.read_text().splitlines() if "resumed from" in line]
    assert len(resumed) == 1 and 3 <= int(resumed[0].split()[-1]) < STEPS, resumed  # mid-run
    assert_same_state(final_state(tmp_path / "last.pt"), straight)


def free_port():
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def test_two_nodes_on_one_machine_match_one_node_with_two_processes(tmp_path, straight):
    # README's multi-node command, as two torchrun "nodes" of one process each on 127.0.0.1
    launch = ["--nnodes=2", "--nproc_per_node=1", "--rdzv-backend=c10d",
              f"--rdzv-endpoint=127.0.0.1:{free_port()}", "--rdzv-id=two-nodes"]
    command = LAUNCH + ["--out", str(tmp_path)]
    nodes = [torchrun(launch, command, tmp_path / f"node{n}.log") for n in (0, 1)]
    codes = [finish(node, 240) for node in nodes]
    assert codes == [0, 0], [(tmp_path / f"node{n}.log").read_text()[-3000:] for n in (0, 1)]
    assert_same_state(final_state(tmp_path / "last.pt"), straight)


def test_sigterm_to_torchrun_saves_and_the_same_command_with_resume_continues(tmp_path, straight):
    # a scheduler's pre-emption: SIGTERM to the launcher, which passes it on to its workers
    command = LAUNCH + ["--out", str(tmp_path)]
    process = torchrun(TWO_PROCESSES, command, tmp_path / "first.log")
    wait_for_file(tmp_path / "last.pt", process)
    process.send_signal(signal.SIGTERM)
    assert finish(process, 60) not in (0, None)
    text = (tmp_path / "first.log").read_text()
    assert "stopped at step" in text and "(SIGTERM)" in text, text[-3000:]
    stopped_at, _ = final_state(tmp_path / "last.pt")
    assert 3 <= stopped_at < STEPS
    relaunch = torchrun(TWO_PROCESSES, command + ["--resume"], tmp_path / "second.log")
    assert finish(relaunch, 240) == 0, (tmp_path / "second.log").read_text()[-3000:]
    text = (tmp_path / "second.log").read_text()
    assert f"resumed from {tmp_path}/last.pt at step {stopped_at}" in text
    assert_same_state(final_state(tmp_path / "last.pt"), straight)


def test_a_signal_repeated_by_the_launcher_still_saves_first(monkeypatch):
    # Ctrl-C (or a scheduler signalling every process) reaches a worker directly and again through
    # torchrun, milliseconds apart: one request to stop at the next step boundary, not "stop now"
    import common

    exits = []
    monkeypatch.setattr(os, "_exit", exits.append)  # what the handler would end the process with
    handlers = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        stop = common.StopSignal()
        os.kill(os.getpid(), signal.SIGTERM)
        os.kill(os.getpid(), signal.SIGTERM)
        assert (stop.received, exits) == ("SIGTERM", [])
        stop.first_signal_at -= 10  # asked again 10 s later (Ctrl-C pressed twice): stop now
        os.kill(os.getpid(), signal.SIGINT)
        assert exits == [128 + signal.SIGINT]
    finally:
        signal.alarm(0)  # the first signal armed the 120 s grace alarm
        for sig, handler in handlers.items():
            signal.signal(sig, handler)


KILL_DURING_SAVE = """
import io, sys, time
import torch
import common

out = sys.argv[1]
common.save_checkpoint(dict(step=2, model=dict(w=torch.full((1000,), 2.0))), out + "/last.pt")
real_save = torch.save


def slow_save(state, stream):
    # write half of the checkpoint, tell the test, and wait there to be killed
    buffer = io.BytesIO()
    real_save(state, buffer)
    stream.write(buffer.getvalue()[:len(buffer.getvalue()) // 2])
    stream.flush()
    open(out + "/writing", "w").close()
    time.sleep(600)


torch.save = slow_save
common.save_checkpoint(dict(step=3, model=dict(w=torch.full((1000,), 3.0))), out + "/last.pt")
"""


def test_sigkill_while_writing_a_checkpoint_keeps_the_previous_one(tmp_path):
    driver = tmp_path / "driver.py"
    driver.write_text(KILL_DURING_SAVE)
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=ROOT)
    process = subprocess.Popen([sys.executable, str(driver), str(tmp_path)], cwd=ROOT, env=env,
                               stderr=subprocess.PIPE, text=True)
    wait_for_file(tmp_path / "writing", process)
    process.send_signal(signal.SIGKILL)
    process.wait()
    torn = [path for path in tmp_path.iterdir() if path.name.startswith("last.pt.")]
    assert len(torn) == 1 and torn[0].suffix == ".tmp" and torn[0].stat().st_size > 0
    with pytest.raises(Exception):  # really killed half-way through step 3's file
        torch.load(torn[0], weights_only=True)
    state = torch.load(tmp_path / "last.pt", weights_only=True)
    assert state["step"] == 2 and torch.equal(state["model"]["w"], torch.full((1000,), 2.0))


HANG_ONE_RANK = """
import os, sys, time
import common
import byol

real_check_finite = common.check_finite


def check_finite_that_hangs_on_rank_1(step, terms, checkpoint):
    # rank 1 stops answering at step 3 (a stuck read, a deadlock); rank 0 waits in the all-reduce
    if step == 3 and os.environ["RANK"] == "1":
        open(sys.argv[1] + "/hang_started", "w").write(str(time.time()))
        time.sleep(600)
    return real_check_finite(step, terms, checkpoint)


common.check_finite = check_finite_that_hangs_on_rank_1
byol.main(sys.argv[2:])
"""


def test_a_hung_rank_is_named_once_the_collective_timeout_expires(tmp_path):
    driver = tmp_path / "driver.py"
    driver.write_text(HANG_ONE_RANK)
    log = tmp_path / "log"
    command = [str(driver), str(tmp_path)] + LAUNCH[1:] + ["--out", str(tmp_path / "run")]
    env = dict(SSL_COLLECTIVE_TIMEOUT="5", PYTHONPATH=ROOT)
    process = torchrun(TWO_PROCESSES, command, log, env)
    deadline = time.time() + 120  # without a collective timeout: gloo's default, 30 min
    try:
        while "\nerror: " not in log.read_text() and process.poll() is None:
            assert time.time() < deadline, log.read_text()[-3000:]
            time.sleep(0.1)
        reported = time.time()
    finally:
        finish(process, 0.1)  # torchrun would SIGTERM rank 1 now, and SIGKILL it 30 s later
    text = log.read_text()
    assert [line for line in text.splitlines() if line.startswith("error: ")] == [
        "error: rank 0: a collective did not complete within 5 s (SSL_COLLECTIVE_TIMEOUT); "
        "rank 1 never reached it (hung or much slower than the others): stopping"], text[-4000:]
    # 5 s timeout + 3 s for the other ranks to report themselves, and slack for a loaded machine
    assert reported - float((tmp_path / "hang_started").read_text()) < 5 + 3 + 10


def test_checkpoint_files_get_the_usual_permissions(tmp_path):
    # the temp file behind the atomic write is created 0600; the checkpoint must be readable like
    # any file the user writes (another account's eval job, a shared team folder)
    import stat

    import common

    umask = os.umask(0o022)
    try:
        common.save_checkpoint({"step": 1, "model": {"w": torch.ones(2)}}, tmp_path / "last.pt")
    finally:
        os.umask(umask)
    assert stat.S_IMODE((tmp_path / "last.pt").stat().st_mode) == 0o644


# each method's tiny arguments, from its own tests (module, name)
TINY_ARGS = {"byol": ("test_byol", "TINY"), "ladder_byol": ("test_ladder_byol", "TINY"),
             "dense_byol": ("test_dense_byol", "TINY"), "densesiam": ("test_densesiam", "TINY"),
             "lewel": ("test_lewel", "TINY_RUN"), "mcl": ("test_mcl", "TINY")}


@pytest.mark.parametrize("method", list(TINY_ARGS))
def test_a_stop_on_the_last_step_of_an_epoch_keeps_its_checkpoint(method, tmp_path):
    """--stop-after (or SIGTERM) on an epoch's last step: the epoch-end save is skipped by the
    stop, so the stop itself must write last.pt, and --resume must go on from the next epoch."""
    module = importlib.import_module(method)
    test_module, name = TINY_ARGS[method]
    args = getattr(importlib.import_module(test_module), name) + [
        "--epochs", "2", "--device", "cpu", "--out", str(tmp_path)]
    value = dict(zip(args, args[1:]))  # the last of a repeated flag wins, as in argparse
    steps_per_epoch = int(value["--synthetic-size"]) // int(value["--batch-size"])
    module.main(args + ["--stop-after", str(steps_per_epoch)])
    assert torch.load(tmp_path / "last.pt", weights_only=True)["step"] == steps_per_epoch
    assert module.main(args + ["--resume"])["step"] == 2 * steps_per_epoch
