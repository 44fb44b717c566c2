"""Crash and resume (SIGKILL), SIGTERM checkpointing, non-finite loss, checkpoint mix-ups (issue: reliability)."""

import os
import signal
import subprocess
import sys
import time

import pytest
import torch

import byol
import eval_linear
from ddp_runner import ROOT

TINY = ["--synthetic-size", "64", "--image-size", "32", "--batch-size", "8", "--hidden-dim", "64", "--proj-dim", "32",
        "--epochs", "1", "--knn-every", "0", "--log-every", "1", "--device", "cpu"]


def start(args):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    return subprocess.Popen([sys.executable, "byol.py", *args], cwd=ROOT, env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)


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
    return state["step"], {**state["model"], **{"target." + k: v for k, v in state["target"].items()}}


def test_sigkill_then_resume_is_bitwise_equal_to_a_straight_run(tmp_path):
    # every run in a subprocess with the same environment (thread count changes float summation order)
    straight = start(TINY + ["--out", str(tmp_path / "straight")])
    assert straight.wait(timeout=240) == 0, straight.communicate()
    crashed = tmp_path / "crashed"
    process = start(TINY + ["--out", str(crashed), "--ckpt-every-steps", "1"])
    wait_for_step(crashed / "last.pt", 3, process)
    process.send_signal(signal.SIGKILL)
    process.wait()
    killed_at, _ = weights(crashed / "last.pt")
    assert 3 <= killed_at < 8, killed_at  # really killed mid-run, and last.pt is readable
    resumed = start(TINY + ["--out", str(crashed), "--resume"])
    assert resumed.wait(timeout=240) == 0, resumed.communicate()
    step_a, a = weights(tmp_path / "straight" / "last.pt")
    step_b, b = weights(crashed / "last.pt")
    assert step_a == step_b == 8
    for name in a:
        assert torch.equal(a[name], b[name]), name


def test_sigterm_saves_a_checkpoint_and_exits_nonzero(tmp_path):
    process = start(TINY + ["--out", str(tmp_path), "--ckpt-every-steps", "1", "--synthetic-size", "400"])
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
        byol.main(TINY + ["--out", str(tmp_path), "--resume", "--base-lr", "inf", "--ckpt-every-steps", "1"])
    assert exit_info.value.code == 3
    message = capsys.readouterr().err.strip().splitlines()[-1]
    assert message.startswith("error: non-finite") and "at step" in message and "last good checkpoint kept" in message
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
    sources = "".join(open(os.path.join(ROOT, name)).read() for name in os.listdir(ROOT) if name.endswith(".py"))
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
    # one image per process: BatchNorm has no batch statistics to train on; 2 per process is the least that works
    with pytest.raises(common.InputError, match=r"--batch-size 4 leaves 1 image per process .* use --batch-size 8"):
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
    result = byol.main(TINY + ["--data", str(tmp_path), "--workers", "0", "--out", str(tmp_path / "out"),
                               "--stop-after", "1"])
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
