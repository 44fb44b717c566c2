"""Run a method file's train() under `torchrun --standalone --nproc_per_node=2` on CPU (gloo) and
return each rank's final online and target state dicts. Used by every method's DDP test; also
final_state, what a resumed run must reproduce."""

import os
import subprocess
import sys
import textwrap

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

SCRIPT = textwrap.dedent("""
    import sys
    sys.path.insert(0, {root!r})
    import torch
    import common
    import {module} as method

    cfg = common.parse_config(method.Config, method.PRESETS, sys.argv[1:])
    dist = common.setup_distributed("cpu")
    result = method.train(cfg, dist)
    torch.save(dict(model=result["model"].state_dict(), target=result["target"].state_dict()),
               f"{{cfg.out}}/rank{{dist.rank}}.pt")
    common.cleanup_distributed()
""")


def run_two_processes(module, args, out_dir, timeout=240):
    """Train `module` (e.g. "byol") with 2 CPU processes; returns [rank0_state, rank1_state]."""
    script = os.path.join(out_dir, f"ddp_{module}.py")
    with open(script, "w") as handle:
        handle.write(SCRIPT.format(root=ROOT, module=module))
    env = dict(os.environ, OMP_NUM_THREADS="1")
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
               script, "--out", str(out_dir), "--device", "cpu", *args]
    result = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True,
                            timeout=timeout)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return [torch.load(os.path.join(out_dir, f"rank{rank}.pt"), weights_only=True)
            for rank in range(2)]


def final_state(path):
    """(step, every tensor a resumed run must reproduce) of a last.pt: online and target weights and
    buffers, optimizer state, LEWEL_M's queue."""
    state = torch.load(path, weights_only=True)
    tensors = {f"{part}.{name}": value for part in ("model", "target", "queue")
               for name, value in (state.get(part) or {}).items()}
    for index, slots in state["optimizer"]["state"].items():
        tensors.update({f"optimizer.{index}.{name}": value for name, value in slots.items()
                        if torch.is_tensor(value)})
    return state["step"], tensors


def assert_same_parameters(states):
    """Both ranks hold identical weights, online and target (BN running statistics are rank-local:
    skipped)."""
    for key in ("model", "target"):
        names = [name for name, value in states[0][key].items()
                 if value.is_floating_point() and "running" not in name]
        assert names, key
        for name in names:
            assert torch.equal(states[0][key][name], states[1][key][name]), \
                f"{key}.{name} differs across ranks"
