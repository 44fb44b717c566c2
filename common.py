"""Shared toolbox for the method files (byol.py, ladder_byol.py, dense_byol.py, densesiam.py,
lewel.py, mcl.py).

A toolbox, not a framework: plain functions and small classes, no base classes to inherit, no
registry, no hooks. Each section below is one topic; a method file imports what it needs and writes
its own heads, losses and loop.

Sections: config | distributed and device | backbone, heads, losses (with dense matching)
          | augmentation | data | optimisation (LARS, schedules, EMA) | checkpoints
          | logging and timing | kNN monitor | dense labels and mIoU | pictures (--show)

Config fields common.py reads by name, so a method's Config (or a copy of one) needs them:
    data, val_data, synthetic_size, image_size, load_size, workers, gpu_decode, seed
        (make_loaders, show_batch)
    arch, stem, batch_size, base_lr, epochs, precision, resume, out
        (check_common_config, should_resume)
    num_classes, num_things (make_seg_loaders, with data, synthetic_size, workers, seed)
check_resume_compatible compares arch, stem, image_size, batch_size and epochs (or the keys it is
given) with the checkpoint's; print_run_header prints every field. The other fields are the
method file's own.
"""

import argparse
import contextlib
import dataclasses
import datetime
import inspect
import io
import json
import math
import os
import signal
import sys
import tempfile
import textwrap
import time
import tokenize
from pathlib import Path

import torch
import torch.distributed as torch_dist
import torch.nn as nn
import torch.nn.functional as F
import torchvision
import torchvision.transforms.v2.functional as TF

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
STAGES = ("res2", "res3", "res4", "res5")


# --------------------------------------------------------------------------------------------------
# Config: one frozen dataclass per method file -> --flags, --preset NAME, --config file.yaml
# --------------------------------------------------------------------------------------------------

class InputError(Exception):
    """A problem with what the user gave us (flags, data, checkpoint). main() turns it into one line
    and exit code 2."""


class TrainingError(Exception):
    """Training cannot go on (non-finite loss). main() turns it into one line and exit code 3."""


def die(message, code=2):
    """Print one clear line naming the problem and exit non-zero. Use only from main()."""
    print(f"error: {message}", file=sys.stderr, flush=True)
    sys.exit(code)


@contextlib.contextmanager
def main_errors():
    """main()'s one exit path: InputError -> one line, exit 2; TrainingError -> one line, exit 3;
    the process group is destroyed however the body ends."""
    try:
        yield
    except InputError as error:
        die(str(error))
    except TrainingError as error:
        die(str(error), code=3)
    finally:
        cleanup_distributed()


def _parse_value(text, kind, name):
    try:
        if kind is bool:
            if text.lower() in ("1", "true", "yes", "on"):
                return True
            if text.lower() in ("0", "false", "no", "off"):
                return False
            raise ValueError
        if kind in (tuple, list):
            return tuple(_auto(item) for item in text.split(",") if item.strip() != "")
        return kind(text)
    except ValueError:
        flag = name.replace("_", "-")
        raise InputError(f"--{flag}: cannot read {text!r} as {kind.__name__}") from None


def _auto(text):
    text = text.strip()
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return text


def field_comments(config_cls):
    """{field name: the comment written after it in the class source}, the single source of --help.

    A comment goes on over the comment-only lines below its field that are indented past the field
    names; a comment-only line at the fields' own indentation (`# model`) heads the next group and
    belongs to no field. {} when the class has no source file.
    """
    try:
        source = textwrap.dedent(inspect.getsource(config_cls))
    except (OSError, TypeError):
        return {}
    names = {field.name for field in dataclasses.fields(config_cls)}
    rows = {}  # source row -> its tokens (comments included, line breaks and indents left out)
    for token in tokenize.generate_tokens(io.StringIO(source).readline):
        if token.type not in (tokenize.NL, tokenize.NEWLINE, tokenize.INDENT, tokenize.DEDENT):
            rows.setdefault(token.start[0], []).append(token)
    comments, name, name_column = {}, None, 0
    for tokens in rows.values():  # in source order
        first, last = tokens[0], tokens[-1]
        if len(tokens) > 2 and first.string in names and tokens[1].string == ":":
            name, name_column = first.string, first.start[1]
            if last.type == tokenize.COMMENT:
                comments[name] = last.string.lstrip("#").strip()
        elif len(tokens) == 1 and first.type == tokenize.COMMENT and first.start[1] > name_column \
                and name in comments:
            comments[name] += " " + first.string.lstrip("#").strip()
        else:
            name = None
    return comments


def _flag_text(value):
    """A default as it is typed after its flag: true/false, comma lists, "" for nothing."""
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, (tuple, list)):
        value = ",".join(map(str, value))
    return '""' if value == "" else str(value)


def parse_config(config_cls, presets=None, argv=None):
    """Build a frozen config: dataclass defaults < --preset NAME < --config file.yaml < explicit
    --flags.

    Every field `batch_size` becomes `--batch-size`; booleans also accept `--no-flag`; tuples are
    comma lists. --help shows each field's comment (field_comments) and default. The returned
    dataclass is frozen: derived values get their own names in the code, the config is never
    rewritten.
    """
    presets = presets or {}
    fields = {f.name: f for f in dataclasses.fields(config_cls)}
    comments = field_comments(config_cls)
    summary = (config_cls.__doc__ or "").strip().splitlines()
    parser = argparse.ArgumentParser(description=summary[0] if summary else None)
    if presets:
        parser.add_argument("--preset", default=None, metavar="NAME",
                            help=f"a recipe from PRESETS, applied before --config and the flags: "
                                 f"{', '.join(presets)}")
    order = "after --preset and before the flags" if presets else "before the flags"
    parser.add_argument("--config", default=None, metavar="YAML",
                        help=f"file of field: value pairs, applied {order}")
    for name, field in fields.items():
        flag = "--" + name.replace("_", "-")
        default = _flag_text(field.default)
        if field.default is True:
            default += f"; --no-{flag[2:]} turns it off"
        text = f"(default: {default})"
        text = f"{comments[name]} {text}" if name in comments else text
        text = text.replace("%", "%%")  # argparse %-formats help strings
        if field.type is bool:
            parser.add_argument(flag, dest=name, nargs="?", const="true", default=None,
                                metavar="BOOL", help=text)
            parser.add_argument("--no-" + flag[2:], dest=name, action="store_const",
                                const="false", help=argparse.SUPPRESS)
        else:
            metavar = "LIST" if field.type is tuple else field.type.__name__.upper()
            parser.add_argument(flag, dest=name, default=None, metavar=metavar, help=text)
    args = parser.parse_args(argv)

    values = {}
    if getattr(args, "preset", None) is not None:
        if args.preset not in presets:
            raise InputError(f"unknown preset {args.preset!r}; choose from {sorted(presets)}")
        values.update(presets[args.preset])
    if args.config is not None:
        import yaml  # only needed for --config

        try:
            with open(args.config) as handle:
                loaded = yaml.safe_load(handle) or {}
        except OSError as error:
            raise InputError(f"cannot read --config {args.config}: {error.strerror}") from None
        except yaml.YAMLError as error:
            first = str(error).splitlines()[0]
            raise InputError(f"--config {args.config} is not valid YAML: {first}") from None
        if not isinstance(loaded, dict):
            raise InputError(f"--config {args.config} must be a mapping of field: value")
        for key, value in loaded.items():
            key = key.replace("-", "_")
            if key not in fields:
                raise InputError(f"--config {args.config}: unknown field {key!r}")
            values[key] = tuple(value) if isinstance(value, list) else value
    for name, field in fields.items():
        text = getattr(args, name)
        if text is not None:
            values[name] = _parse_value(text, field.type, name)
    for name, value in list(values.items()):  # YAML/preset values: coerce to the field's type
        kind = fields[name].type
        if kind is float and isinstance(value, int) and not isinstance(value, bool):
            values[name] = float(value)
        elif kind is tuple and not isinstance(value, tuple):
            values[name] = (value,)
    return config_cls(**values)


def config_dict(cfg):
    """Plain dict of primitives (safe for weights_only checkpoints and JSON)."""
    return {key: (list(value) if isinstance(value, tuple) else value)
            for key, value in dataclasses.asdict(cfg).items()}


def check(condition, message):
    if not condition:
        raise InputError(message)


def check_common_config(cfg, world_size):
    """Checks every method shares (batch, epochs, lr, stages). Raises InputError with one line."""
    check(cfg.batch_size > 0, f"--batch-size must be positive, got {cfg.batch_size}")
    check(cfg.batch_size % world_size == 0,
          f"--batch-size {cfg.batch_size} (global) is not divisible by the world size {world_size}")
    # BatchNorm in training mode needs 2 values per channel; the projector's BN1d sees 1 per image.
    check(cfg.batch_size // world_size >= 2,
          f"--batch-size {cfg.batch_size} leaves 1 image per process ({world_size} process(es)); "
          f"BatchNorm needs at least 2 per process to train: use --batch-size {2 * world_size} "
          f"or more")
    check(cfg.epochs > 0, f"--epochs must be positive, got {cfg.epochs}")
    check(cfg.image_size >= 8, f"--image-size must be at least 8, got {cfg.image_size}")
    check(cfg.arch in ("resnet18", "resnet50"),
          f"--arch must be resnet18 or resnet50, got {cfg.arch!r}")
    check(cfg.stem in ("imagenet", "cifar"), f"--stem must be imagenet or cifar, got {cfg.stem!r}")
    check(cfg.base_lr > 0, f"--base-lr must be positive, got {cfg.base_lr}")
    check_precision(cfg.precision)
    # before any data or model is built
    check(not cfg.resume or (Path(cfg.out) / "last.pt").is_file(),
          f"--resume: checkpoint {Path(cfg.out) / 'last.pt'} does not exist")


# --------------------------------------------------------------------------------------------------
# Distributed and device: one launch path. torchrun sets RANK/LOCAL_RANK/WORLD_SIZE; plain
# `python x.py` is world size 1. device_setup: bf16 or fp32 (--precision).
# --------------------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Dist:
    rank: int
    local_rank: int
    world_size: int
    device: torch.device

    @property
    def is_main(self):
        return self.rank == 0


_DIST = Dist(0, 0, 1, torch.device("cpu"))
_STORE = None  # this restart round's key-value store, once the process group exists


def collective_timeout():
    """Seconds a collective waits for the slowest rank before this rank gives up:
    $SSL_COLLECTIVE_TIMEOUT, default 600 (NCCL's default; gloo's is 1800). What one rank does alone
    while the others wait (rank 0 writing a checkpoint, a first torch.compile) must fit in it."""
    text = os.environ.get("SSL_COLLECTIVE_TIMEOUT", "600")
    try:
        seconds = float(text)
    except ValueError:
        seconds = 0.0
    check(seconds > 0, f"SSL_COLLECTIVE_TIMEOUT must be a positive number of seconds, got {text!r}")
    return seconds


def _restart_round_store(rank, world_size):
    """torchrun's key-value store (MASTER_ADDR:MASTER_PORT), keys prefixed by the restart round.

    NOTE: torchrun keeps one store for the whole job (`_shared_tcp_store_server` in
    torch/distributed/elastic/rendezvous/dynamic_rendezvous.py) and its workers join it with no
    per-restart prefix (`_create_c10d_store` in torch/distributed/rendezvous.py). After a
    --max-restarts restart the store still holds the dead workers' gloo addresses under the keys the
    new workers use, and a new worker that reads one before its peer overwrites it dies in
    connectFullMesh ("connection refused"). A prefix per TORCHELASTIC_RESTART_COUNT keeps the
    rounds apart.
    """
    if not (os.environ.get("MASTER_ADDR") and os.environ.get("MASTER_PORT")):
        raise InputError(f"WORLD_SIZE={world_size} needs MASTER_ADDR and MASTER_PORT: "
                         f"launch with torchrun")
    agent_hosts_it = os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True"  # else rank 0 does
    store = torch_dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]),
                                world_size, is_master=rank == 0 and not agent_hosts_it)
    restart_round = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
    return torch_dist.PrefixStore(f"restart_{restart_round}", store)


def setup_distributed(device=None):
    """Read the torchrun environment, pick the device, init the process group (nccl on CUDA, gloo
    on CPU). Collectives give up after collective_timeout() seconds (cleanup_distributed then names
    the ranks that never came)."""
    global _DIST, _STORE
    rank = int(os.environ.get("RANK", 0))
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    world_size = int(os.environ.get("WORLD_SIZE", 1))
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(device)
    if device.type == "cuda":
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    if world_size > 1 and not torch_dist.is_initialized():
        timeout = datetime.timedelta(seconds=collective_timeout())
        _STORE = _restart_round_store(rank, world_size)
        backend = "nccl" if device.type == "cuda" else "gloo"
        torch_dist.init_process_group(backend, store=_STORE, rank=rank, world_size=world_size,
                                      timeout=timeout)
    _DIST = Dist(rank, local_rank, world_size, device)
    return _DIST


PRECISIONS = ("auto", "bf16", "fp32")  # the values of every Config's `precision`


def check_precision(precision):
    check(precision in PRECISIONS,
          f"--precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")


def native_bf16_cpu():
    """True on a CPU with bf16 arithmetic in hardware (AVX512-BF16 or AMX tiles), where oneDNN runs
    bf16 convolutions and matmuls natively. Elsewhere bf16 is emulated, slower than float32."""
    probes = (getattr(torch.cpu, "_is_avx512_bf16_supported", None),  # absent from older torch
              getattr(torch.cpu, "_is_amx_tile_supported", None))
    return any(probe() for probe in probes if probe is not None)


def resolve_precision(device, precision):
    """What --precision means on `device`: "bf16" or "fp32". auto = bf16 on CUDA and on CPUs with
    native bf16 (native_bf16_cpu), fp32 elsewhere."""
    check_precision(precision)
    if precision != "auto":
        return precision
    return "bf16" if device.type == "cuda" or native_bf16_cpu() else "fp32"


def device_setup(dist, precision="auto"):
    """Device-side speed settings; returns (autocast dtype or None, memory format) for the loop.

    bf16: forward passes under torch.autocast(bfloat16) on channels_last tensors; parameters,
    gradients, optimiser state and losses stay float32. fp32: float32, contiguous. On CUDA, cuDNN
    picks its fastest kernels, and float32 matmuls use TF32 except under --precision fp32.
    """
    chosen = resolve_precision(dist.device, precision)
    if dist.device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = chosen == "bf16"
        torch.backends.cudnn.allow_tf32 = chosen == "bf16"
        torch.backends.cudnn.benchmark = True
    if chosen == "bf16":
        return torch.bfloat16, torch.channels_last
    return None, torch.contiguous_format


def describe_precision(device, precision):
    """The run header's words: "fp32 (auto: no native bf16 on this CPU)", "bf16", ..."""
    chosen = resolve_precision(device, precision)
    if precision != "auto":
        return chosen
    if device.type == "cuda":
        return f"{chosen} (auto: CUDA)"
    return f"{chosen} (auto: {'native' if native_bf16_cpu() else 'no native'} bf16 on this CPU)"


def cleanup_distributed():
    """Destroy the process group. Every main() calls this in its `finally`.

    When main() is leaving because a collective timed out (gloo: "Timed out waiting ..."), this rank
    first finds out which ranks never reached that collective and ends the run with one line naming
    them (exit code 4).
    NOTE: on CUDA, NCCL's watchdog ends a timed-out process by default
    (TORCH_NCCL_ASYNC_ERROR_HANDLING), with its own message, before this runs.
    """
    global _STORE
    error = sys.exc_info()[1]  # the exception main() is leaving with, if any
    timed_out = isinstance(error, RuntimeError) and "timed out" in str(error).lower()
    message = _collective_timeout_report() if timed_out and _STORE is not None else None
    if torch_dist.is_initialized():
        torch_dist.destroy_process_group()
    _STORE = None
    if message:
        die(message, code=4)


def _collective_timeout_report(grace=3.0):
    """Every rank that timed out marks itself in the store and waits up to `grace` seconds for the
    others to do the same: the ranks still unmarked never reached the collective (hung, or far
    behind)."""
    seconds = collective_timeout()
    try:
        _STORE.set(f"timed_out_{_DIST.rank}", "1")
        deadline = time.monotonic() + min(grace, seconds)
        while True:
            missing = [rank for rank in range(_DIST.world_size)
                       if not _STORE.check([f"timed_out_{rank}"])]
            if not missing or time.monotonic() > deadline:
                break
            time.sleep(0.2)
    except RuntimeError:  # the store went away with the node that hosts it
        missing = None
    head = (f"rank {_DIST.rank}: a collective did not complete within {seconds:g} s "
            f"(SSL_COLLECTIVE_TIMEOUT)")
    if missing is None:
        return f"{head}; the store is unreachable, so which rank hung is unknown: stopping"
    if not missing:
        return f"{head}; every rank was waiting, in different collectives: stopping"
    names = f"rank {missing[0]}" if len(missing) == 1 else f"ranks {', '.join(map(str, missing))}"
    return f"{head}; {names} never reached it (hung or much slower than the others): stopping"


def is_main():
    return _DIST.rank == 0


def print0(*args, **kwargs):
    if _DIST.rank == 0:
        print(*args, **kwargs, flush=True)


def barrier():
    if torch_dist.is_initialized():
        torch_dist.barrier()


def all_gather_nograd(tensor):
    """Concatenate `tensor` from every rank along dim 0 (equal shapes on every rank); no
    gradient."""
    if not torch_dist.is_initialized() or torch_dist.get_world_size() == 1:
        return tensor
    parts = [torch.empty_like(tensor) for _ in range(torch_dist.get_world_size())]
    torch_dist.all_gather(parts, tensor.contiguous())
    return torch.cat(parts)


def gather_ragged(tensor):
    """Concatenate a tensor whose first dim may differ between ranks, in rank order (identity on
    one process)."""
    if not torch_dist.is_initialized() or torch_dist.get_world_size() == 1:
        return tensor
    count = torch.tensor([tensor.shape[0]], device=tensor.device)
    counts = all_gather_nograd(count).tolist()
    padded = tensor.new_zeros((max(counts),) + tensor.shape[1:])
    padded[:tensor.shape[0]] = tensor
    gathered = all_gather_nograd(padded)
    return torch.cat([gathered[i * max(counts):i * max(counts) + c] for i, c in enumerate(counts)])


def all_reduce_mean(tensor):
    if torch_dist.is_initialized():
        tensor = tensor.clone()
        torch_dist.all_reduce(tensor)
        tensor /= torch_dist.get_world_size()
    return tensor


# --------------------------------------------------------------------------------------------------
# Backbone, heads and losses shared by several methods
# --------------------------------------------------------------------------------------------------

class ResNetTrunk(nn.Module):
    """torchvision ResNet returning the stage maps {"res2", ..., "res5"} (no avgpool, no fc).

    stem="imagenet": 7x7/2 conv + 3x3/2 max-pool (strides 4/8/16/32).
    stem="cifar":    3x3/1 conv, no max-pool (strides 1/2/4/8), the usual choice for 32-64 px
                     images.
    Attribute names match torchvision (conv1, bn1, layer1..layer4), so `state_dict()` loads into
    `torchvision.models.resnetXX()` with strict=False (only fc is missing; the cifar stem's conv1 is
    3x3).
    """

    def __init__(self, arch="resnet18", stem="imagenet", zero_init_residual=False):
        super().__init__()
        net = getattr(torchvision.models, arch)(weights=None, zero_init_residual=zero_init_residual)
        if stem == "cifar":
            net.conv1 = nn.Conv2d(3, 64, kernel_size=3, stride=1, padding=1, bias=False)
            nn.init.kaiming_normal_(net.conv1.weight, mode="fan_out", nonlinearity="relu")
            net.maxpool = nn.Identity()
        self.conv1, self.bn1, self.relu, self.maxpool = net.conv1, net.bn1, net.relu, net.maxpool
        self.layer1, self.layer2 = net.layer1, net.layer2
        self.layer3, self.layer4 = net.layer3, net.layer4
        widths = [layer[-1].conv3.out_channels if hasattr(layer[-1], "conv3")
                  else layer[-1].conv2.out_channels
                  for layer in (self.layer1, self.layer2, self.layer3, self.layer4)]
        self.channels = dict(zip(STAGES, widths))

    def forward(self, x, last_stage="res5"):
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        maps = {}
        for name, layer in zip(STAGES, (self.layer1, self.layer2, self.layer3, self.layer4)):
            x = layer(x)
            maps[name] = x  # B x C_stage x H/stride x W/stride
            if name == last_stage:
                break
        return maps


def load_torchvision_weights(trunk, path):
    """Load a torchvision ResNet state_dict (e.g. its supervised ImageNet weights) from the --init
    file `path` into a ResNetTrunk; fc is left out. Returns the keys the file lacks."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except (OSError, RuntimeError) as error:
        first = str(error).splitlines()[0][:160]
        raise InputError(f"--init {path}: cannot read a state_dict: {first}") from None
    state = state.get("state_dict", state) if isinstance(state, dict) else state
    missing, unexpected = trunk.load_state_dict(state, strict=False)
    unexpected = [key for key in unexpected if not key.startswith("fc.")]
    if unexpected or len(missing) == len(trunk.state_dict()):
        raise InputError(f"--init {path}: not a torchvision ResNet state_dict for this arch "
                         f"(missing {len(missing)}, unexpected {unexpected[:3]})")
    return missing


def mlp(in_dim, hidden_dim=4096, out_dim=256):
    """BYOL projector/predictor: Linear -> BN -> ReLU -> Linear (BYOL Sec. 3.3;
    google-deepmind/deepmind-research byol/utils/networks.py)."""
    return nn.Sequential(nn.Linear(in_dim, hidden_dim), nn.BatchNorm1d(hidden_dim),
                         nn.ReLU(inplace=True), nn.Linear(hidden_dim, out_dim))


def conv_mlp(in_dim, hidden_dim=4096, out_dim=256):
    """The same MLP applied at every position of a B x C x H x W map (1x1 convolutions)."""
    return nn.Sequential(nn.Conv2d(in_dim, hidden_dim, 1), nn.BatchNorm2d(hidden_dim),
                         nn.ReLU(inplace=True), nn.Conv2d(hidden_dim, out_dim, 1))


def regression_loss(p, z):
    """BYOL loss, one direction: mean of 2 - 2 cos(p, sg(z)) over every dim but the channel dim 1.
    Range [0, 4].

    Computed in float32 (normalise, then dot product) whatever the autocast dtype. The symmetric
    BYOL total is regression_loss(p1, z2) + regression_loss(p2, z1), range [0, 8].
    """
    p = F.normalize(p.float(), dim=1)
    z = F.normalize(z.detach().float(), dim=1)
    return (2 - 2 * (p * z).sum(dim=1)).mean()


def global_pool(feature_map):
    """B x C x H x W -> B x C."""
    return feature_map.mean(dim=(2, 3))


# ---- Dense matching (DenseBYOL, Ladder-DenseBYOL) ----
# DenseCL-style correspondence between the feature maps of two views (Wang et al. 2021, Sec. 3.2;
# Ladder Siamese Network Eq. 7 "align"): every position of view a regresses onto the position of
# view b that looks most like it.

@torch.no_grad()
def dense_match(query, key, max_elements=2 ** 26):
    """For every query position, the index of the key position with the highest cosine similarity.

    query: B x C x H x W (view a), key: B x C x H' x W' (view b) -> idx: B x HW, in [0, H'W').
    argmax has no gradient, so this runs under no_grad: it only decides which target vector each
    position regresses onto. The B x HW x H'W' similarity is built a few images at a time (at most
    `max_elements` entries, 256 MB in float32): at res2 of a 224 px view (56 x 56) one image alone
    needs 3136^2 = 9.8 M entries.
    """
    with torch.autocast(query.device.type, enabled=False):  # bf16 merges near-ties (2^-8 near 1)
        query = F.normalize(query.flatten(2).float(), dim=1)  # B x C x HW
        key = F.normalize(key.flatten(2).float(), dim=1)  # B x C x H'W'
        per_chunk = max(1, max_elements // (query.shape[2] * key.shape[2]))
        return torch.cat([torch.einsum("bcq,bck->bqk", query[start:start + per_chunk],
                                       key[start:start + per_chunk]).argmax(dim=2)
                          for start in range(0, query.shape[0], per_chunk)])  # B x HW


def gather_positions(features, idx):
    """Pick positions of a map: features B x C x H x W, idx B x N (flat indices into H x W)
    -> B x C x N."""
    flat = features.flatten(2)  # B x C x HW
    return flat.gather(2, idx.unsqueeze(1).expand(-1, flat.shape[1], -1))


def dense_regression_loss(prediction, target, query, key):
    """One direction of the DenseBYOL loss (Ladder Siamese Network Eq. 7). Range [0, 4].

    mean over batch and positions (i, j) of 2 - 2 cos(prediction_ij, sg(target at the position
    matched to ij)). prediction: B x D x H x W (online prediction of view a); target:
    B x D x H' x W' (target projection of view b); query: B x C x H x W and key: B x C x H' x W',
    the maps of views a and b the matching is computed on.
    """
    aligned = gather_positions(target, dense_match(query, key))  # B x D x HW
    return regression_loss(prediction.flatten(2), aligned)


# --------------------------------------------------------------------------------------------------
# Augmentation: per-sample parameters, batched on the model's device. uint8 in, normalised float
# out.
# --------------------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class ViewRecipe:
    """One view's augmentation recipe. Defaults = BYOL view 1 (BYOL Appendix B, Table 6;
    google-deepmind/deepmind-research byol/utils/augmentations.py).

    NOTE: the colour jitter has torchvision's ColorJitter semantics (brightness and contrast as
    factors, contrast around the grey mean, saturation as a blend with grey), as PyTorch BYOL code
    has; DeepMind's augmentations.py adds a brightness delta in [-0.4, 0.4], takes contrast around
    each channel's mean and scales saturation in HSV. The ranges and probabilities are Table 6's.
    The crop boxes follow torchvision's rule too (sample_crop_boxes), not DeepMind's single draw
    clipped to the image."""
    crop_scale: tuple = (0.08, 1.0)       # area fraction of the input image
    crop_ratio: tuple = (3 / 4, 4 / 3)    # aspect ratio range (log-uniform)
    interpolation: str = "bicubic"        # bicubic (BYOL) or bilinear (LEWEL, MCL, MoCo v2)
    flip_p: float = 0.5
    jitter: tuple = (0.4, 0.4, 0.2, 0.1)  # brightness, contrast, saturation, hue
    jitter_p: float = 0.8
    gray_p: float = 0.2
    blur_p: float = 1.0
    # blur_sigma: pixels at 224 px; scaled with the output size (see gaussian_blur)
    blur_sigma: tuple = (0.1, 2.0)
    solarize_p: float = 0.0


BYOL_VIEWS = (ViewRecipe(blur_p=1.0, solarize_p=0.0), ViewRecipe(blur_p=0.1, solarize_p=0.2))
SIMSIAM_VIEW = ViewRecipe(crop_scale=(0.2, 1.0), interpolation="bilinear",
                          jitter=(0.4, 0.4, 0.4, 0.1), blur_p=0.5)
MOCO_V2_VIEW = SIMSIAM_VIEW
GEOMETRY_ONLY = ViewRecipe(jitter_p=0.0, gray_p=0.0, blur_p=0.0, solarize_p=0.0)


def sample_crop_boxes(batch, height, width, scale, ratio, generator, device, attempts=10):
    """torchvision's RandomResizedCrop rule, vectorised: B boxes (x0, y0, x1, y1) in [0, 1] of the
    input image.

    Up to `attempts` draws of (area, log-ratio) per sample; the first that fits wins; otherwise the
    whole image.
    """
    area = height * width
    rand = torch.rand(batch, attempts, 4, generator=generator, device=device)
    target_area = area * (scale[0] + (scale[1] - scale[0]) * rand[..., 0])
    log_ratio = math.log(ratio[0]) + (math.log(ratio[1]) - math.log(ratio[0])) * rand[..., 1]
    aspect = torch.exp(log_ratio)
    crop_w = torch.sqrt(target_area * aspect)
    crop_h = torch.sqrt(target_area / aspect)
    fits = (crop_w <= width) & (crop_h <= height)
    first = torch.where(fits.any(dim=1), fits.float().argmax(dim=1),
                        torch.full((batch,), -1, device=device))
    pick = first.clamp(min=0)
    rows = torch.arange(batch, device=device)
    w = torch.where(first >= 0, crop_w[rows, pick],
                    torch.full((batch,), float(width), device=device))
    h = torch.where(first >= 0, crop_h[rows, pick],
                    torch.full((batch,), float(height), device=device))
    x0 = (width - w) * rand[rows, pick, 2]
    y0 = (height - h) * rand[rows, pick, 3]
    return torch.stack([x0 / width, y0 / height, (x0 + w) / width, (y0 + h) / height], dim=1)


def crop_resize(images, boxes, flips, out_size, interpolation="bilinear"):
    """Resample each image's box to out_size x out_size, mirrored where flips is True. images: B x C
    x H x W float.

    grid_sample's rules (align_corners=False, edge-based boxes, border padding; bicubic clamped to
    [0, 1]): output column j samples x = x0 + (j + 0.5) / S * (x1 - x0) of the input, in [0, 1]
    coordinates of the whole image. The map is axis-aligned, hence separable: view_b = rows_b @
    image_b @ cols_b^T with per-sample S x H and S x W interpolation matrices. On CPU two batched
    matmuls do it (~1.5x faster than grid_sample on one thread, 64 px).
    NOTE: on CUDA we keep grid_sample: it is fast there, and device_setup turns on TF32 matmuls,
    which would round the pixels to 10-bit mantissas (errors up to ~1e-3 instead of ~1e-6).
    NOTE: no anti-aliasing when a crop is shrunk (torchvision's PIL path anti-aliases). Crops are
    mostly enlarged (scale < 1 of a load size close to the output size), where the two agree.
    Geometry and sampling run in float32 (float64 for float64 input) with autocast off, on every
    device: a bf16 feature map cropped under autocast (DenseSiam's seg forward) would otherwise
    get a bf16 theta/grid or bf16 weights, up to ~0.4 cells off on an 80 x 80 map. The result
    has the input's dtype.
    """
    batch, channels, height, width = images.shape
    dtype = torch.promote_types(images.dtype, torch.float32)
    x0, y0, x1, y1 = boxes.to(dtype).unbind(dim=1)
    with torch.autocast(images.device.type, enabled=False):
        source = images.to(dtype)
        if images.is_cuda:
            sign = 1.0 - 2.0 * flips.to(dtype)
            theta = torch.zeros(batch, 2, 3, device=images.device, dtype=dtype)
            theta[:, 0, 0] = (x1 - x0) * sign
            theta[:, 0, 2] = x0 + x1 - 1
            theta[:, 1, 1] = y1 - y0
            theta[:, 1, 2] = y0 + y1 - 1
            grid = F.affine_grid(theta, (batch, channels, out_size, out_size), align_corners=False)
            out = F.grid_sample(source, grid, mode=interpolation, padding_mode="border",
                                align_corners=False)
        else:
            no_flips = torch.zeros_like(flips)
            rows = _resample_matrix(y0, y1, no_flips, height, out_size, interpolation)
            cols = _resample_matrix(x0, x1, flips, width, out_size, interpolation)
            out = source.reshape(batch, channels * height, width) @ cols.transpose(1, 2)  # BxCHxS
            out = rows.unsqueeze(1) @ out.view(batch, channels, height, out_size)  # B x C x S x S
    out = out.clamp_(0, 1) if interpolation == "bicubic" else out
    return out.to(images.dtype)


def _resample_matrix(start, end, flips, in_size, out_size, interpolation):
    """B x out_size x in_size matrices whose row j interpolates a length-in_size signal at the
    centre of output pixel j of the segment [start, end] (B each, in [0, 1] units of the signal), in
    reverse order where flips is True.

    grid_sample along one axis: the coordinate arithmetic of affine_grid (normalised to [-1, 1]) and
    grid_sample (align_corners=False), so the two agree to float rounding; taps outside the signal
    are clamped to its ends (padding_mode="border"), so taps that land on the same end pixel add up.
    """
    centres = (torch.linspace(-1, 1, out_size, device=start.device, dtype=start.dtype)
               * (out_size - 1) / out_size)
    sign = 1.0 - 2.0 * flips.to(start.dtype)
    # B x out, in [-1, 1]
    normalised = (start + end - 1).view(-1, 1) + ((end - start) * sign).view(-1, 1) * centres
    x = ((normalised + 1) * in_size - 1) / 2                                       # in input pixels
    left = x.floor()
    t = x - left
    if interpolation == "bicubic":
        weights, first_tap = _cubic_weights(t), -1
    else:
        weights, first_tap = torch.stack([1 - t, t], dim=-1), 0
    offsets = torch.arange(first_tap, first_tap + weights.shape[-1], device=x.device)
    taps = (left.long().unsqueeze(-1) + offsets).clamp_(0, in_size - 1)             # B x out x taps
    matrix = torch.zeros(x.shape[0], out_size, in_size, device=x.device, dtype=x.dtype)
    # one tap at a time: taps clamped onto the same pixel add up in a fixed order
    for tap in range(taps.shape[-1]):
        matrix.scatter_add_(2, taps[..., tap:tap + 1], weights[..., tap:tap + 1])
    return matrix


def _cubic_weights(t, a=-0.75):
    """Weights (t.shape x 4) of the taps at floor(x) - 1, ..., floor(x) + 2 for t = x - floor(x):
    Keys' cubic convolution with a = -0.75, torch's bicubic kernel (grid_sample, interpolate)."""
    near = lambda d: ((a + 2) * d - (a + 3)) * d * d + 1       # 0 <= d <= 1
    far = lambda d: ((a * d - 5 * a) * d + 8 * a) * d - 4 * a  # 1 <= d <= 2
    return torch.stack([far(t + 1), near(t), near(1 - t), far(2 - t)], dim=-1)


def antialiased_crop_resize(images, boxes, flips, size):
    """Each image's box (edge-based, normalised, on whole pixels) resized to size x size, mirrored
    where flips is True, as F.interpolate(crop, mode="bilinear", antialias=True) of each crop would
    (PIL's bilinear resize does the same). crop_resize's counterpart for crops that are shrunk.

    Separable: out_b = rows_b @ image_b @ cols_b^T (_antialias_weights), no per-image loop or sync.
    NOTE: on CUDA, device_setup's TF32 matmuls round pixels by up to ~1e-3 (1/4 of a uint8 step)."""
    x0, y0, x1, y1 = boxes.float().unbind(dim=1)
    height, width = images.shape[-2:]
    rows = _antialias_weights(y0, y1, torch.zeros_like(flips), height, size)   # B x S x H
    cols = _antialias_weights(x0, x1, flips, width, size)                      # B x S x W
    out = images.float() @ cols.transpose(1, 2).unsqueeze(1)                  # B x C x H x S
    return rows.unsqueeze(1) @ out                                             # B x C x S x S


def _antialias_weights(start, end, flips, in_size, out_size):
    """B x out_size x in_size weights of torch's antialiased bilinear resize of the segment
    [start, end] (B each, in [0, 1] units of a length-in_size signal) to out_size samples, in
    reverse order where flips is True.

    With scale = input pixels per output pixel, output j is centred at start + (j + 0.5) * scale
    and takes the segment's input pixels with weight 1 - distance / max(scale, 1) between centres
    (a triangle as wide as the scale when shrinking, plain bilinear when enlarging), renormalised
    to sum 1 (which clamps at the segment's ends)."""
    first, last = start * in_size, end * in_size                  # B: segment edges, input pixels
    scale = (last - first) / out_size
    centres = torch.arange(out_size, device=start.device, dtype=torch.float32) + 0.5
    centres = torch.where(flips.view(-1, 1), out_size - centres, centres)   # B x out, mirrored
    centres = first.view(-1, 1) + centres * scale.view(-1, 1)     # B x out, input pixels
    pixels = torch.arange(in_size, device=start.device, dtype=torch.float32) + 0.5
    distance = (pixels - centres.unsqueeze(-1)).abs()             # B x out x in
    weights = (1 - distance / scale.clamp(min=1).view(-1, 1, 1)).clamp_(min=0)
    weights *= (pixels > first.view(-1, 1, 1)) & (pixels < last.view(-1, 1, 1))   # segment only
    return weights / weights.sum(dim=-1, keepdim=True)


def _gray(x):  # B x 3 x H x W -> B x 1 x H x W (luma weights of torchvision and DeepMind BYOL)
    return (0.2989 * x[:, 0:1]).add_(x[:, 1:2], alpha=0.587).add_(x[:, 2:3], alpha=0.114)


def adjust_linear(x, scale, gray_weight, mean_weight):
    """clamp(scale x + gray_weight gray(x) + mean_weight mean(gray(x)), 0, 1), each weight B (one
    per sample).

    Brightness, contrast and saturation by a factor f are all of this form, with weights (f, 0, 0),
    (f, 0, 1 - f) and (f, 1 - f, 0); (1, 0, 0) leaves an image in [0, 1] unchanged. So one pass can
    apply a different one to each sample.
    """
    gray = _gray(x)                                                                  # B x 1 x H x W
    mean = gray.mean(dim=(1, 2, 3), keepdim=True)                                    # B x 1 x 1 x 1
    shared = torch.addcmul(mean * mean_weight.view(-1, 1, 1, 1), gray,
                           gray_weight.view(-1, 1, 1, 1))
    return torch.addcmul(shared, x, scale.view(-1, 1, 1, 1)).clamp_(0, 1)        # shared by R, G, B


def adjust_brightness(x, factor):   # factor: B
    return adjust_linear(x, factor, torch.zeros_like(factor), torch.zeros_like(factor))


def adjust_contrast(x, factor):
    return adjust_linear(x, factor, torch.zeros_like(factor), 1 - factor)


def adjust_saturation(x, factor):
    return adjust_linear(x, factor, 1 - factor, torch.zeros_like(factor))


def adjust_hue(x, shift):
    """Rotate each sample's hue by shift (B, in turns), keeping HSV saturation and value, as
    torchvision.

    RGB -> hue -> RGB in closed form, elementwise: with v = max(r, g, b) and delta = v - min(r, g,
    b), the hue in sixths of a turn is (g - b) / delta, 2 + (b - r) / delta or 4 + (r - g) / delta
    where v is r, g or b (first match). Back: channel n = 5, 3, 1 (R, G, B) is v - delta
    clamp(min(k, 4 - k), 0, 1), k = (n + hue) mod 6, computed as v - 2 delta + delta clamp(|k - 2|,
    1, 2) (min(k, 4 - k) = 2 - |k - 2|): fewer passes over the images.
    """
    r, g, b = x.unbind(dim=1)
    # elementwise: faster than a reduction over the channel dim
    value = torch.maximum(torch.maximum(r, g), b)
    delta = value - torch.minimum(torch.minimum(r, g), b)
    # hue x delta: 4 delta + r - g, replaced by 2 delta + b - r where v is g, then by g - b where v
    # is r (x + m (y - x) with a 0/1 mask m: torch.where is several times slower on CPU)
    hue = (r - g).add_(delta, alpha=4)
    hue.addcmul_((value == g).to(x.dtype), (b - r).add_(delta, alpha=2).sub_(hue))
    hue.addcmul_((value == r).to(x.dtype), (g - b).sub_(hue))
    # where delta = 0 the hue is 0 and unused
    hue.div_(delta.clamp(min=1e-12)).add_(6 * shift.view(-1, 1, 1))
    n = torch.arange(5.0, 0.0, -2.0, device=x.device, dtype=x.dtype).view(1, 3, 1, 1)  # 5, 3, 1
    k = hue.unsqueeze(1) + n                                 # B x 3 x H x W
    k.sub_(k.div(6).floor_().mul_(6))                        # mod 6 (faster than remainder_ on CPU)
    return torch.addcmul((value - 2 * delta).unsqueeze(1), delta.unsqueeze(1),
                         k.sub_(2).abs_().clamp_(1, 2))


def gaussian_blur(x, sigma, kernel_size):
    """Separable Gaussian blur with one sigma per sample (B,), reflect padding, as torchvision's
    GaussianBlur.

    NOTE: DeepMind BYOL pads with zeros ('SAME'); we reflect like torchvision to avoid darkened
    borders.
    """
    batch, channels, height, width = x.shape
    half = kernel_size // 2
    offsets = torch.arange(kernel_size, device=x.device, dtype=x.dtype) - half
    kernel = torch.exp(-offsets.view(1, -1) ** 2 / (2 * sigma.view(-1, 1).to(x.dtype) ** 2))
    kernel = kernel / kernel.sum(dim=1, keepdim=True)                      # B x k
    kernel = kernel.repeat_interleave(channels, dim=0)                      # (B*C) x k
    flat = x.reshape(1, batch * channels, height, width)
    mode = "reflect" if half < min(height, width) else "replicate"
    flat = F.pad(flat, (half, half, half, half), mode=mode)
    flat = F.conv2d(flat, kernel.view(-1, 1, 1, kernel_size), groups=batch * channels)
    flat = F.conv2d(flat, kernel.view(-1, 1, kernel_size, 1), groups=batch * channels)
    return flat.view(batch, channels, height, width)


def blur_kernel_size(image_size):
    """BYOL: kernel = 10 % of the side, odd: 23 taps at 224 px."""
    return 2 * int(image_size / 10 / 2) + 1


# what color_augment calls; see compile_colour_ops
_COLOUR_OPS = dict(linear=adjust_linear, hue=adjust_hue)
_COMPILED_COLOUR_OPS = {}                                 # filled on the first compile_colour_ops()


def compile_colour_ops(enabled=True):
    """--compile: color_augment's jitter ops go through torch.compile, or back to eager with
    enabled=False.

    Each op is a chain of ~10 elementwise passes over the images in eager mode; compiled, it is one
    fused loop (on CPU adjust_hue at 256 x 64 px: 19 ms eager, 4 ms compiled; outputs agree to
    1e-7). dynamic=True: the subsets that draw an op change size every step, so one compiled kernel
    serves every size. Compiling takes ~20 s once and needs a C++ compiler on CPU (Triton on CUDA),
    hence opt-in, like the model's --compile.
    """
    if enabled and not _COMPILED_COLOUR_OPS:
        _COMPILED_COLOUR_OPS.update(linear=torch.compile(adjust_linear, dynamic=True),
                                    hue=torch.compile(adjust_hue, dynamic=True))
    _COLOUR_OPS.update(_COMPILED_COLOUR_OPS if enabled
                       else dict(linear=adjust_linear, hue=adjust_hue))


def solarize(x):
    return torch.where(x >= 0.5, 1.0 - x, x)


def _apply_subset(x, mask, fn, *per_sample):
    """x[mask] = fn(x[mask], *per_sample[mask]) without touching the other samples; returns the
    result.

    On CUDA the op runs on the whole batch and a per-sample select keeps it where mask is True: more
    arithmetic, but no host synchronisation (indexing by a mask needs the count of True on the
    host). On CPU, only the chosen samples are computed (fn on x itself when all are chosen) and
    written back into x in place, so x must be a tensor the caller may overwrite.
    """
    if x.is_cuda:
        return torch.where(mask.view(-1, 1, 1, 1), fn(x, *per_sample), x)
    index = mask.nonzero().squeeze(1)
    if index.numel() == 0:
        return x
    if index.numel() == x.shape[0]:
        return fn(x, *per_sample)
    out = fn(x.index_select(0, index), *(value.index_select(0, index) for value in per_sample))
    return x.index_copy_(0, index, out)


def color_augment(x, recipe, generator):
    """Colour jitter (random order per sample), grayscale, blur, solarize. x: B x 3 x S x S float in
    [0, 1].

    Returns a new tensor (x is not modified). The jitter applies brightness, contrast, saturation
    and hue in a random order per sample; the first three are adjust_linear, so each of the four
    positions is one adjust_linear pass over the batch (each sample with its op's weights; identity
    for hue or no jitter) and then adjust_hue on the samples whose op at that position is hue.
    """
    batch, device = x.shape[0], x.device
    u = torch.rand(batch, 12, generator=generator, device=device)
    b, c, s, h = recipe.jitter
    brightness = 1 - b + 2 * b * u[:, 0]
    contrast = 1 - c + 2 * c * u[:, 1]
    saturation = 1 - s + 2 * s * u[:, 2]
    hue_shift = -h + 2 * h * u[:, 3]
    jitter_on = u[:, 4] < recipe.jitter_p
    # per-sample op order
    order = torch.argsort(torch.rand(batch, 4, generator=generator, device=device), dim=1)
    if recipe.jitter_p > 0:
        # adjust_linear's weights (scale, gray, mean) of each sample's brightness, contrast,
        # saturation and hue/no-op
        one, zero = torch.ones_like(brightness), torch.zeros_like(brightness)
        weights = torch.stack([torch.stack([brightness, contrast, saturation, one], dim=1),
                               torch.stack([zero, zero, 1 - saturation, zero], dim=1),
                               torch.stack([zero, 1 - contrast, zero, zero], dim=1)],
                              dim=1)  # B x 3 x 4
        rows = torch.arange(batch, device=device)
        for position in range(4):
            # 0 brightness, 1 contrast, 2 saturation, 3 hue / none
            op = torch.where(jitter_on, order[:, position], 3)
            x = _COLOUR_OPS["linear"](x, *weights[rows, :, op].unbind(dim=1))
            x = _apply_subset(x, jitter_on & (order[:, position] == 3), _COLOUR_OPS["hue"],
                              hue_shift)
    else:
        x = x.clone()  # the subset updates below may write in place
    x = _apply_subset(x, u[:, 5] < recipe.gray_p,
                      lambda v: _gray(v).expand(-1, 3, -1, -1).contiguous())
    # NOTE: sigma in [0.1, 2] px is defined at 224 px; we keep the same blur relative to the image.
    sigma_scale = x.shape[-1] / 224
    low, high = recipe.blur_sigma
    sigma = (low + (high - low) * u[:, 6]) * sigma_scale
    kernel = blur_kernel_size(x.shape[-1])
    if kernel > 1:
        x = _apply_subset(x, u[:, 7] < recipe.blur_p,
                          lambda v, sd: gaussian_blur(v, sd, kernel), sigma)
    x = _apply_subset(x, u[:, 8] < recipe.solarize_p, solarize)
    return x


_MEAN_STD = {}  # (device, dtype) -> ImageNet mean and std, 1 x 3 x 1 x 1, copied there once


def normalize(x):
    """(x - ImageNet mean) / std per channel. The constants are copied to the device once: a copy
    from host memory on every call would make the CPU wait for the GPU each step."""
    key = (x.device, x.dtype)
    if key not in _MEAN_STD:
        _MEAN_STD[key] = tuple(torch.tensor(values, dtype=x.dtype).view(1, 3, 1, 1).to(x.device)
                               for values in (IMAGENET_MEAN, IMAGENET_STD))
    mean, std = _MEAN_STD[key]
    return (x - mean).div_(std)


def augment(images, recipe, out_size, generator=None):
    """One augmented view of every image, each sample with its own random parameters.

    images: B x 3 x H x W uint8 on the device. Returns (views B x 3 x S x S float32 normalised,
    boxes B x 4 (x0, y0, x1, y1) in [0, 1] coordinates of `images`, flips B bool).
    """
    batch, _, height, width = images.shape
    device = images.device
    boxes = sample_crop_boxes(batch, height, width, recipe.crop_scale, recipe.crop_ratio,
                              generator, device)
    flips = torch.rand(batch, generator=generator, device=device) < recipe.flip_p
    views = crop_resize(images.float().div_(255), boxes, flips, out_size, recipe.interpolation)
    views = color_augment(views, recipe, generator)
    return normalize(views), boxes, flips


def eval_transform(images, out_size):
    """uint8 B x 3 x H x W -> normalised float, resized to out_size when needed (centre view for
    kNN/eval)."""
    x = images.float().div_(255)
    if x.shape[-1] != out_size or x.shape[-2] != out_size:
        x = F.interpolate(x, size=(out_size, out_size), mode="bilinear", align_corners=False,
                          antialias=True)
    return normalize(x)


def step_generator(device, seed, rank, step):
    """A fresh generator per (seed, rank, step): augmentation draws depend only on these, so resume
    is exact."""
    generator = torch.Generator(device=device)
    generator.manual_seed((seed * 1_000_003 + rank * 7_919 + step) % (2 ** 63))
    return generator


# --------------------------------------------------------------------------------------------------
# Data: built-in synthetic digits, CIFAR-10, ImageNet-layout and unlabelled image folders.
# Batches reach the device as uint8.
# --------------------------------------------------------------------------------------------------

SYNTHETIC_CLASSES = ("background",) + tuple(str(digit) for digit in range(10))  # mask classes


def _loop(cx, cy, rx, ry, points=10, start=0.0):
    """A closed pen stroke around an ellipse, clockwise from angle `start` (0 = top)."""
    return [(cx + rx * math.sin(start + 2 * math.pi * k / points),
             cy - ry * math.cos(start + 2 * math.pi * k / points)) for k in range(points + 1)]


# The ten digits as pen strokes (polylines) in a box x in [-0.55, 0.55], y in [-0.8, 0.8], y down.
_SIX = [(0.4, -0.8), (-0.3, -0.2), (-0.5, 0.4), (-0.2, 0.8), (0.3, 0.75), (0.45, 0.35),
        (0.2, 0.05), (-0.2, 0.05), (-0.45, 0.3)]
DIGIT_STROKES = (
    [_loop(0, 0, 0.5, 0.8)],
    [[(-0.3, -0.5), (0.05, -0.8), (0.05, 0.8)], [(-0.3, 0.8), (0.4, 0.8)]],
    [[(-0.5, -0.45), (-0.2, -0.8), (0.3, -0.8), (0.5, -0.45), (0.35, -0.1), (-0.5, 0.8),
      (0.55, 0.8)]],
    [[(-0.5, -0.8), (0.5, -0.8), (0.0, -0.1), (0.45, 0.2), (0.4, 0.6), (0.0, 0.8), (-0.5, 0.6)]],
    [[(0.3, 0.8), (0.3, -0.8), (-0.5, 0.3), (0.55, 0.3)]],
    [[(0.5, -0.8), (-0.4, -0.8), (-0.45, -0.1), (0.2, -0.15), (0.5, 0.2), (0.4, 0.65), (0.0, 0.8),
      (-0.5, 0.65)]],
    [_SIX],
    [[(-0.5, -0.8), (0.5, -0.8), (-0.1, 0.8)], [(-0.2, 0.0), (0.35, 0.0)]],
    [_loop(0, -0.42, 0.35, 0.38, 8), _loop(0, 0.38, 0.45, 0.42, 8, math.pi)],
    [[(-x, -y) for x, y in _SIX]],                                         # a 6 turned upside down
)


def _digit_segments():
    """DIGIT_STROKES as one tensor 10 x M x 2 (ends) x 2 (x, y), short digits padded by repeating
    their last segment."""
    per_digit = [[(a, b) for line in strokes for a, b in zip(line[:-1], line[1:])]
                 for strokes in DIGIT_STROKES]
    longest = max(len(segments) for segments in per_digit)
    return torch.tensor([segments + segments[-1:] * (longest - len(segments))
                         for segments in per_digit])


def make_synthetic(num_images, image_size=64, seed=0, num_classes=10, with_masks=False):
    """Built-in labelled dataset: the digits 0-9 (the classes) drawn as pen strokes, white on black,
    blurred like a low-resolution scan.

    Each image draws its digit's strokes (DIGIT_STROKES) with its own pose, a random affine map
    (rotation within +-8 degrees, shear within +-0.1, height 50-80 % of the image, width 85-115 % of
    that, shifted anywhere it fits), and its own pen width; the strokes are rendered at 32 px,
    reduced to 8 x 8 by area averaging and resized to image_size (bicubic). So a class is a shape,
    not a colour, seen in many poses, as in scikit-learn's 8 x 8 digit scans, on which byol.py's
    CPU defaults learn (README "What the CPU defaults show"). Deterministic from `seed`. kNN top-1
    of the frozen random-init ResNet-18 (ImageNet stem, 32 px, seed 0): 61.84 % (val = the 2,560
    images after the 2,560 training ones).
    NOTE: no colour and no noise: drawn with a random colour per image, or with a random tint,
    polarity and pixel noise, the same digits left byol.py's default run below its random-init kNN
    (colour, which carries no label, is then the easiest cue that tells two images apart).
    Returns (images N x 3 x S x S uint8, labels N int64: the digit, in [0, num_classes));
    with_masks=True adds per-pixel labels N x S x S int64 (SYNTHETIC_CLASSES: 0 background,
    1 + the digit where the blurred stroke is at least 30 % white). The images are the same with
    or without them (the masks take no random draws).
    """
    g = dict(generator=torch.Generator().manual_seed(seed))
    n, render = num_images, 32
    labels = torch.arange(n) % num_classes
    labels = labels[torch.randperm(n, **g)]
    angle = (torch.rand(n, **g) * 2 - 1) * math.radians(8)
    height = 0.5 + 0.3 * torch.rand(n, **g)
    width = height * (0.85 + 0.3 * torch.rand(n, **g))
    shear = (torch.rand(n, **g) * 2 - 1) * 0.1
    shift = (torch.rand(n, 2, **g) * 2 - 1) * (1 - height[:, None]) * 0.7
    pen = 0.07 + 0.07 * torch.rand(n, **g)          # half-width of the pen, in [-1, 1] units
    # pose: rotate(angle) @ [[width, shear * height], [0, height]], then shift
    cos, sin = torch.cos(angle), torch.sin(angle)
    pose = torch.stack([torch.stack([cos * width, cos * shear * height - sin * height], -1),
                        torch.stack([sin * width, sin * shear * height + cos * height], -1)], -2)
    ends = torch.einsum("nij,nmej->nmei", pose, _digit_segments()[labels]) + shift[:, None, None]
    coords = (torch.arange(render, dtype=torch.float32) + 0.5) / render * 2 - 1
    yy, xx = torch.meshgrid(coords, coords, indexing="ij")
    pixels = torch.stack([xx, yy], -1).reshape(1, -1, 1, 2)                 # 1 x P x 1 x 2
    ink = []
    for chunk in torch.arange(n).split(256):  # distance of every pixel to its nearest segment
        start = ends[chunk, None, :, 0]                                    # k x 1 x M x 2
        vector = ends[chunk, None, :, 1] - start
        along = (((pixels - start) * vector).sum(-1)
                 / (vector * vector).sum(-1).clamp(min=1e-8)).clamp(0, 1)   # k x P x M
        distance = (pixels - start - along[..., None] * vector).norm(dim=-1).amin(-1)
        # anti-aliased pen: fully inked within pen - half a pixel, blank beyond pen + half a pixel
        ink.append(((pen[chunk, None] - distance) * render / 2 + 0.5).clamp(0, 1))
    ink = torch.cat(ink).view(n, 1, render, render)
    blurred = F.interpolate(F.interpolate(ink, size=(8, 8), mode="area"),
                            size=(image_size, image_size), mode="bicubic",
                            align_corners=False).clamp(0, 1)
    images = (blurred.expand(-1, 3, -1, -1) * 255).round().to(torch.uint8)
    if not with_masks:
        return images, labels
    masks = torch.where(blurred[:, 0] >= 0.3, labels[:, None, None] + 1, 0)
    return images, labels, masks


class TensorLoader:
    """Iterate a dataset held as one uint8 tensor (on the device) in per-rank batches of a seeded
    permutation.

    The order of epoch e depends only on (seed, e), so a resumed run sees the same batches;
    `start_batch` skips batches already done in a partly finished epoch.
    """

    def __init__(self, images, labels, batch_per_rank, rank, world_size, seed, shuffle=True,
                 drop_last=True):
        self.images, self.labels = images, labels
        self.batch, self.rank, self.world, self.seed = batch_per_rank, rank, world_size, seed
        self.shuffle, self.drop_last = shuffle, drop_last
        self.epoch, self.start_batch = 0, 0

    def set_epoch(self, epoch, start_batch=0):
        self.epoch, self.start_batch = epoch, start_batch

    def __len__(self):
        n = len(self.images) // self.world
        return n // self.batch if self.drop_last else math.ceil(n / self.batch)

    def _indices(self):
        n = len(self.images)
        if self.shuffle:
            generator = torch.Generator().manual_seed(self.seed * 10_007 + self.epoch)
            order = torch.randperm(n, generator=generator)
        else:
            order = torch.arange(n)
        per_rank = n // self.world
        return order[self.rank * per_rank:(self.rank + 1) * per_rank]

    def __iter__(self):
        indices = self._indices().to(self.images.device)
        for b in range(self.start_batch, len(self)):
            chosen = indices[b * self.batch:(b + 1) * self.batch]
            yield self.images.index_select(0, chosen), self.labels.index_select(0, chosen)


class _ImageFolderSquares(torch.utils.data.Dataset):
    """Image files as uint8 tensors: shorter side resized to `size`, centre square of `size`.

    NOTE: pretraining crops are then taken from this square, not from the whole image as
    torchvision's RandomResizedCrop and the papers' pipelines take them: the sides of a non-square
    image are never seen (a 4:3 image loses a quarter of its width), and a small crop is upsampled
    from the square (256 px for 224-px views) rather than cut from the full-resolution image. It is
    what makes every batch one uint8 tensor, augmented on the device; a larger --load-size keeps
    more resolution, not the sides.

    samples: list of (path, label), label -1 in an unlabelled folder. With raw=True the items are
    the undecoded file bytes (decoded later on the device, see FolderLoader).
    """

    def __init__(self, samples, size, raw=False):
        self.samples, self.size, self.raw = samples, size, raw

    def __len__(self):
        return len(self.samples)

    def __getitem__(self, index):
        from PIL import Image, UnidentifiedImageError

        path, label = self.samples[index]
        if self.raw:
            return torchvision.io.read_file(path), label, index
        try:
            with Image.open(path) as image:
                image = TF.pil_to_tensor(image.convert("RGB"))
        except (OSError, UnidentifiedImageError, SyntaxError) as error:
            raise InputError(f"cannot decode image {path}: {error}") from None
        return resize_square(image, self.size), label


def resize_square(image, size):
    """uint8 C x H x W -> C x size x size: shorter side to `size` (antialiased), then the centre
    square."""
    return TF.center_crop(TF.resize(image, size, antialias=True), size)


def _collate_raw(batch):
    return ([item[0] for item in batch], torch.tensor([item[1] for item in batch]),
            [item[2] for item in batch])


class FolderLoader:
    """DataLoader over an ImageFolder with the same interface as TensorLoader (set_epoch, len, uint8
    batches).

    decode_on_device=True: workers only read file bytes; JPEGs are decoded in one batched call on
    the device (torchvision.io.decode_jpeg(device='cuda') uses the GPU's decoder) and resized there.
    Any map-style dataset of (image, label) items works too (e.g. SegmentationPairs: no `raw`).
    """

    def __init__(self, dataset, batch_per_rank, rank, world_size, seed, device, workers,
                 shuffle=True, drop_last=True):
        self.dataset, self.batch, self.rank = dataset, batch_per_rank, rank
        self.world, self.seed = world_size, seed
        self.device, self.workers = device, workers
        self.shuffle, self.drop_last = shuffle, drop_last
        self.raw = getattr(dataset, "raw", False)  # items are file bytes (decode_on_device)
        self.epoch, self.start_batch = 0, 0

    set_epoch = TensorLoader.set_epoch

    def __len__(self):
        total = len(self.dataset)
        n = total // self.world if self.drop_last else math.ceil(total / self.world)
        return n // self.batch if self.drop_last else math.ceil(n / self.batch)

    def _indices(self):
        n = len(self.dataset)
        generator = torch.Generator().manual_seed(self.seed * 10_007 + self.epoch)
        order = torch.randperm(n, generator=generator) if self.shuffle else torch.arange(n)
        per_rank = n // self.world if self.drop_last else math.ceil(n / self.world)
        return order[self.rank * per_rank:(self.rank + 1) * per_rank]

    def _decode(self, data, indices):
        try:
            images = torchvision.io.decode_jpeg(data, mode=torchvision.io.ImageReadMode.RGB,
                                                device=self.device)
        except RuntimeError:
            for item, index in zip(data, indices):  # find the culprit to name it
                try:
                    torchvision.io.decode_jpeg(item, mode=torchvision.io.ImageReadMode.RGB)
                except RuntimeError:
                    path = self.dataset.samples[index][0]
                    raise InputError(f"--gpu-decode: cannot decode {path} as JPEG") from None
            raise
        return torch.stack([resize_square(image, self.dataset.size) for image in images])

    def __iter__(self):
        indices = self._indices()[self.start_batch * self.batch:].tolist()
        loader = torch.utils.data.DataLoader(
            torch.utils.data.Subset(self.dataset, indices), batch_size=self.batch, shuffle=False,
            num_workers=self.workers, pin_memory=self.device.type == "cuda",
            drop_last=self.drop_last, persistent_workers=False,
            collate_fn=_collate_raw if self.raw else None)
        try:
            for batch in loader:
                if self.raw:
                    data, labels, index = batch
                    yield self._decode(data, index), labels.to(self.device, non_blocking=True)
                else:
                    images, labels = batch
                    yield (images.to(self.device, non_blocking=True),
                           labels.to(self.device, non_blocking=True))
        except InputError as error:
            # from a worker: DataLoader re-raises it with the worker's traceback text
            message = str(error).strip().splitlines()[-1].removeprefix("common.InputError: ")
            raise InputError(message) from None


IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")  # what an unlabelled folder is searched for (any case)


def has_labels(data):
    """True for the built-in sets and ImageNet-layout folders (a train/ folder inside). Any other
    folder is a collection of unlabelled images (COCO train2017, a folder of photos)."""
    return data in ("synthetic", "cifar10") or (Path(data) / "train").is_dir()


def _unlabelled_samples(root):
    """(path, -1) for every .jpg/.jpeg/.png under root at any depth, in a fixed order (sorted
    within each folder, the same on every rank). Symlinked folders are followed once; hidden
    files and folders are skipped."""
    samples, seen = [], set()
    for folder, subfolders, files in os.walk(root, followlinks=True):
        real = os.path.realpath(folder)
        if real in seen:  # a symlink back into the tree: do not list (or loop over) a folder twice
            subfolders[:] = []
            continue
        seen.add(real)
        subfolders[:] = sorted(name for name in subfolders if not name.startswith("."))
        samples += [(os.path.join(folder, name), -1) for name in sorted(files)
                    if not name.startswith(".") and name.lower().endswith(IMAGE_SUFFIXES)]
    return samples


def _folder_split(root, split):
    path = Path(root) / split
    if not path.is_dir():
        raise InputError(f"--data {root}: expected class folders under {path} "
                         "(ImageNet layout: train/ and val/)")
    classes = [d for d in sorted(path.iterdir()) if d.is_dir()]
    if not classes:
        raise InputError(f"--data {root}: no class folders in {path}")
    extensions = {".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp"}
    for folder in classes:
        if not any(f.suffix.lower() in extensions for f in folder.iterdir()):
            raise InputError(f"--data {root}: class folder {folder} contains no images")
    return path


def load_dataset(data, image_size, split, synthetic_size=2560, seed=0, raw=False):
    """Return ('tensor', images uint8 N x 3 x S x S, labels) or ('folder', Dataset, None).

    data: "synthetic" (built-in, generated in memory), "cifar10" (torchvision; downloads when the
    network allows; set SSL_DATA_ROOT for its cache), a folder in ImageNet layout (train/ and val/
    class folders), or any other folder: its .jpg/.jpeg/.png files at any depth, unlabelled (label
    -1; split "train" only).
    """
    if data == "synthetic":
        n_train = synthetic_size
        n_val = max(synthetic_size, 10)  # as large as train: kNN noise under 1 point at 2,560
        # fixed seed: it defines the dataset, not the run
        images, labels = make_synthetic(n_train + n_val, image_size, seed=12345)
        if split == "train":
            return "tensor", images[:n_train], labels[:n_train]
        return "tensor", images[n_train:], labels[n_train:]
    if data == "cifar10":
        import numpy as np
        from torchvision.datasets import CIFAR10

        root = os.environ.get("SSL_DATA_ROOT", os.path.expanduser("~/.cache/ssl-data"))
        try:
            dataset = CIFAR10(root, train=(split == "train"), download=True)
        except Exception as error:  # no network and no cache
            raise InputError(f"--data cifar10: could not load or download CIFAR-10 into {root}: "
                             f"{error}") from None
        images = torch.from_numpy(np.asarray(dataset.data)).permute(0, 3, 1, 2).contiguous()
        return "tensor", images, torch.tensor(dataset.targets)
    if not os.path.exists(data):
        raise InputError(f"--data {data}: no such file or directory "
                         f"(use 'synthetic', 'cifar10' or a folder)")
    if not has_labels(data):
        if split != "train":
            raise InputError(f"--data {data} has no train/ folder, so it holds unlabelled "
                             f"images and no {split} split; a labelled set is 'synthetic', "
                             f"'cifar10' or train/ and val/ class folders")
        samples = _unlabelled_samples(data)
        if not samples:
            raise InputError(f"--data {data}: no .jpg, .jpeg or .png files (and no train/)")
        return "folder", _ImageFolderSquares(samples, image_size, raw=raw), None
    from torchvision.datasets import ImageFolder

    path = _folder_split(data, split)
    samples = ImageFolder(str(path)).samples  # (path, class index) pairs; no file is read here
    dataset = _ImageFolderSquares(samples, image_size, raw=raw)
    if len(dataset) == 0:
        raise InputError(f"--data {data}: no images found under {path}")
    return "folder", dataset, None


def make_loader(data, split, image_size, batch_per_rank, dist, seed, workers=8, shuffle=True,
                drop_last=True, synthetic_size=2560, load_size=None, decode_on_device=False):
    """Loader yielding (images uint8 B x 3 x L x L on the device, labels). Small datasets live on
    the device.

    decode_on_device: for folders of JPEGs, decode on the device (GPU decoder on CUDA) instead of in
    the workers.
    """
    kind, dataset, labels = load_dataset(data, load_size or image_size, split, synthetic_size,
                                         raw=decode_on_device)
    if kind == "tensor":
        loader = TensorLoader(dataset.to(dist.device), labels.to(dist.device), batch_per_rank,
                              dist.rank, dist.world_size, seed, shuffle, drop_last)
    else:
        loader = FolderLoader(dataset, batch_per_rank, dist.rank, dist.world_size, seed,
                              dist.device, workers, shuffle, drop_last)
    if len(loader) == 0:
        raise InputError(f"--data {data} ({split}): {len(dataset)} images are fewer than one "
                         f"batch of {batch_per_rank} per rank x {dist.world_size} ranks")
    return loader


def load_size_of(cfg, data=None):
    """Side of the uint8 square the loader produces: the view size for in-memory data, 256/224
    of it for folders. data: the set (default cfg.data; the kNN sets may be cfg.val_data)."""
    if cfg.load_size:
        return cfg.load_size
    in_memory = (data or cfg.data) in ("synthetic", "cifar10")
    return cfg.image_size if in_memory else cfg.image_size * 256 // 224


def make_loaders(cfg, dist, eval_batch=256):
    """The three loaders of a pretraining run: shuffled training batches from cfg.data
    (cfg.batch_size is global), and the unshuffled train (kNN memory bank) and val (kNN queries)
    sets of a labelled set: cfg.val_data when given, else cfg.data when it has labels. With
    neither, bank and val are None: the kNN monitor is off, and one printed line says so.
    Reads cfg.data, val_data, image_size, load_size, batch_size, seed, workers, synthetic_size
    and gpu_decode."""
    common_args = dict(synthetic_size=cfg.synthetic_size, decode_on_device=cfg.gpu_decode)
    train = make_loader(cfg.data, "train", cfg.image_size, cfg.batch_size // dist.world_size,
                        dist, cfg.seed, cfg.workers, load_size=load_size_of(cfg), **common_args)
    if cfg.val_data:
        check(cfg.val_data in ("synthetic", "cifar10") or os.path.exists(cfg.val_data),
              f"--val-data {cfg.val_data}: no such file or directory")
        check(has_labels(cfg.val_data), f"--val-data {cfg.val_data} has no labels: give "
                                        f"'synthetic', 'cifar10' or train/ and val/ class folders")
    knn_data = cfg.val_data or (cfg.data if has_labels(cfg.data) else "")
    if not has_labels(cfg.data):
        monitor = f"on --val-data {knn_data}" if knn_data else "off (--val-data turns it on)"
        print0(f"--data {cfg.data}: {len(train.dataset)} unlabelled images (no train/ folder; "
               f"searched at any depth); kNN monitor {monitor}")
    if not knn_data:
        return train, None, None
    knn_args = dict(common_args, load_size=load_size_of(cfg, knn_data))
    bank = make_loader(knn_data, "train", cfg.image_size, eval_batch, dist, cfg.seed, cfg.workers,
                       shuffle=False, drop_last=False, **knn_args)
    val = make_loader(knn_data, "val", cfg.image_size, eval_batch, dist, cfg.seed, cfg.workers,
                      shuffle=False, drop_last=False, **knn_args)
    return train, bank, val


# --------------------------------------------------------------------------------------------------
# Optimisation: LARS, schedules, EMA
# --------------------------------------------------------------------------------------------------

def lars_param_groups(model, weight_decay, lr_mults=None):
    """Weights (weight decay + LARS adaptation) and biases/norm parameters (neither), as in BYOL.

    lr_mults: optional {module name: factor}; parameters inside a module of that name (a component
    of the dotted parameter name, e.g. "predictor" matches "heads.res2.predictor.0.weight") go to
    their own pair of groups whose "lr_mult" is that factor (the train loop sets group lr = lr *
    lr_mult). Every group has an "lr_mult" (1 by default).
    """
    lr_mults = lr_mults or {}
    groups = {}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        mult = next((m for module, m in lr_mults.items() if module in name.split(".")), 1.0)
        lars = param.ndim > 1  # 1-D = biases and BatchNorm weights/biases
        key = (mult, lars)
        if key not in groups:
            groups[key] = dict(params=[], weight_decay=weight_decay if lars else 0.0, lars=lars,
                               lr_mult=mult)
        groups[key]["params"].append(param)
    # by factor; LARS group first
    return [groups[key] for key in sorted(groups, key=lambda key: (key[0], not key[1]))]


class LARS(torch.optim.Optimizer):
    """LARS (You et al. 2017) with foreach kernels (no per-parameter Python math), in one of two
    published forms.

    form="optax" (DeepMind BYOL; the default):
        lars=True groups:   u = g + wd * w;  u *= trust * ||w|| / ||u||   (when both norms are > 0)
        m = momentum * m + u;  w -= lr * m                                  (lr outside the buffer)
    form="openselfsup" (OpenSelfSup-derived code: the official LEWEL and MCL):
        lars=True groups:   u = (g + wd * w) * trust * ||w|| / (||g|| + wd * ||w||)
        m = momentum * m + lr * u;  w -= m                                  (lr inside the buffer)
    lars=False groups (biases and BatchNorm parameters): u = g, no weight decay, no adaptation, in
    both forms. The two forms agree at a constant lr (and tiny wd); they differ while the lr changes
    (warmup, cosine), because the buffer holds past updates scaled by the lr at which they were made
    in the second form only.
    NOTE: the OpenSelfSup form has no guard for a zero norm; we keep the optax guard (ratio 1) in
    both. Use lars_param_groups(model, wd) to build the groups (1-D parameters are excluded, as BYOL
    excludes biases and BN).
    """

    FORMS = ("optax", "openselfsup")

    def __init__(self, params, lr, momentum=0.9, weight_decay=0.0, trust_coefficient=1e-3,
                 form="optax"):
        if form not in self.FORMS:
            raise InputError(f"--lars-form must be one of {', '.join(self.FORMS)}, not {form!r}")
        super().__init__(params, dict(lr=lr, momentum=momentum, weight_decay=weight_decay,
                                      trust_coefficient=trust_coefficient, lars=True, form=form))

    @torch.no_grad()
    def step(self):
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            if not params:
                continue
            grads = [p.grad for p in params]
            lr_inside = group.get("form", "optax") == "openselfsup"
            if group["lars"]:
                decay = group["weight_decay"]
                updates = (torch._foreach_add(grads, params, alpha=decay) if decay != 0
                           else torch._foreach_mul(grads, 1.0))  # a copy
                weight_norms = torch._foreach_norm(params)
                if lr_inside:  # ||g|| + wd ||w||
                    update_norms = torch._foreach_add(torch._foreach_norm(grads), weight_norms,
                                                      alpha=decay)
                else:          # ||g + wd w||
                    update_norms = torch._foreach_norm(updates)
                w, u = torch.stack(weight_norms), torch.stack(update_norms)  # one per tensor
                ratios = torch.where((w > 0) & (u > 0), group["trust_coefficient"] * w / u,
                                     torch.ones_like(w))
                torch._foreach_mul_(updates, list(ratios.unbind(0)))
            else:
                updates = grads
            buffers = []
            for p in params:
                state = self.state[p]
                if "momentum_buffer" not in state:
                    state["momentum_buffer"] = torch.zeros_like(p)
                buffers.append(state["momentum_buffer"])
            torch._foreach_mul_(buffers, group["momentum"])
            if lr_inside:
                torch._foreach_add_(buffers, updates, alpha=group["lr"])
                torch._foreach_sub_(params, buffers)
            else:
                torch._foreach_add_(buffers, updates)
                torch._foreach_add_(params, buffers, alpha=-group["lr"])


BYOL_OPTIMIZERS = ("lars", "sgd")


def byol_optimizer(name, groups, lr):
    """The optimiser of byol.py and ladder_byol.py (--optimizer): "lars", the papers' LARS, or
    "sgd", plain SGD without momentum (their CPU default, see byol.py's NOTE). Both take
    lars_param_groups' groups, so weight decay is on weights only either way. check_config has
    checked the name."""
    return LARS(groups, lr=lr) if name == "lars" else torch.optim.SGD(groups, lr=lr)


def lr_at(step, total_steps, warmup_steps, peak_lr, final_lr=0.0):
    """Linear warmup from 0 over warmup_steps, then cosine decay from peak_lr to final_lr at
    total_steps."""
    if step < warmup_steps:
        return peak_lr * step / warmup_steps
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    return final_lr + (peak_lr - final_lr) * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))


def cosine_tau(step, total_steps, tau_base):
    """BYOL target momentum: tau(k) = 1 - (1 - tau_base) * (cos(pi k / K) + 1) / 2, from tau_base to
    1."""
    return 1 - (1 - tau_base) * (math.cos(math.pi * step / total_steps) + 1) / 2


def ema_pairs(target, online, buffers=False):
    """Match target tensors to online tensors by name (the target may hold a subset of the online
    modules).

    buffers=True also averages floating-point buffers (BN running stats, as EMAN does); integer
    buffers such as num_batches_tracked are returned separately to be copied, as two lists (target,
    online) that ema_update hands to one foreach copy.
    """
    online_params = dict(online.named_parameters())
    target_list, online_list = [], []
    for name, param in target.named_parameters():
        target_list.append(param)
        online_list.append(online_params[name])
    copy_targets, copy_sources = [], []
    if buffers:
        online_buffers = dict(online.named_buffers())
        for name, buffer in target.named_buffers():
            if buffer.is_floating_point():
                target_list.append(buffer)
                online_list.append(online_buffers[name])
            else:
                copy_targets.append(buffer)
                copy_sources.append(online_buffers[name])
    return target_list, online_list, (copy_targets, copy_sources)


@torch.no_grad()
def ema_update(pairs, tau):
    """target <- tau * target + (1 - tau) * online, for all tensors in one foreach call."""
    target_list, online_list, (copy_targets, copy_sources) = pairs
    torch._foreach_lerp_(target_list, online_list, 1.0 - tau)
    if copy_targets:
        torch._foreach_copy_(copy_targets, copy_sources)


def make_target(online_modules):
    """Deep copy of the online modules (a dict name -> module) as the target network: no
    gradients."""
    import copy

    target = nn.ModuleDict({name: copy.deepcopy(module) for name, module in online_modules.items()})
    for param in target.parameters():
        param.requires_grad_(False)
    return target


# --------------------------------------------------------------------------------------------------
# Checkpoints: atomic writes, weights_only loads
# --------------------------------------------------------------------------------------------------

def save_checkpoint(state, path):
    """Write to a temp file in the same folder, fsync, then rename: a crash never leaves a
    half-written `path`.

    A training state whose weights are no longer finite is refused (TrainingError), so last.pt stays
    the last good one.
    """
    path = Path(path)
    weights = [value for value in state.get("model", {}).values()
               if torch.is_tensor(value) and value.is_floating_point()]
    if weights and not torch.stack([value.float().abs().max()
                                    for value in weights if value.numel()]).isfinite().all():
        raise TrainingError(f"non-finite weights at step {state.get('step')} (the loss diverged); "
                            f"last good checkpoint kept: {path}")
    handle, temp = tempfile.mkstemp(dir=path.parent, prefix=path.name + ".", suffix=".tmp")
    try:
        with os.fdopen(handle, "wb") as stream:
            umask = os.umask(0)
            os.umask(umask)
            os.fchmod(stream.fileno(), 0o666 & ~umask)  # mkstemp made it 0600: the usual mode
            torch.save(state, stream)
            stream.flush()
            os.fsync(stream.fileno())
        os.replace(temp, path)
    except BaseException:
        if os.path.exists(temp):
            os.unlink(temp)
        raise


def load_checkpoint(path, method=None):
    """Load a checkpoint with weights_only=True; clear InputError when missing, truncated or from
    another method."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"checkpoint {path} does not exist")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:
        first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise InputError(f"checkpoint {path} is unreadable (truncated or not a checkpoint): "
                         f"{first[:160]}") from None
    if not isinstance(state, dict) or "model" not in state or "config" not in state:
        raise InputError(f"checkpoint {path} is not a checkpoint of this repo "
                         "(no 'model'/'config' entries)")
    if method is not None and state.get("method") != method:
        raise InputError(f"checkpoint {path} was written by {state.get('method')!r}, "
                         f"not {method!r}")
    return state


def should_resume(cfg):
    """--resume, or an elastic restart: torchrun --max-restarts sets TORCHELASTIC_RESTART_COUNT > 0
    when it restarts the workers, and then the run continues from <out>/last.pt if one was written
    (otherwise it starts over)."""
    restarted = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")) > 0
    return cfg.resume or (restarted and (Path(cfg.out) / "last.pt").is_file())


def rng_state():
    state = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state):
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def check_resume_compatible(state, cfg,
                            keys=("arch", "stem", "image_size", "batch_size", "epochs")):
    saved = state["config"]
    for key in keys:
        if key in saved and saved[key] != getattr(cfg, key):
            raise InputError(f"--resume: checkpoint has {key}={saved[key]!r} "
                             f"but this run has {key}={getattr(cfg, key)!r}")


def prepare_output_dir(path):
    path = Path(path)
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe = path / ".write_test"
        probe.write_text("ok")
        probe.unlink()
    except OSError as error:
        raise InputError(f"--out {path} is not writable: {error.strerror}") from None
    return path


class StopSignal:
    """Remember SIGTERM/SIGINT so the loop can save a checkpoint at a step boundary and exit 128 +
    signal number."""

    def __init__(self):
        self.received, self.first_signal_at = None, None
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, self._handler)

    def _handler(self, signum, frame):
        now = time.monotonic()
        if self.first_signal_at is None:
            self.received, self.first_signal_at = signal.Signals(signum).name, now
            # A rank blocked in a collective (its peer died) never reaches a step boundary:
            # SIGALRM's default action ends it after a grace period, so no teardown hangs on it.
            signal.alarm(120)
        elif now - self.first_signal_at > 5:
            os._exit(128 + signum)  # asked again, later: stop now, without a checkpoint
        # A repeat within 5 s is the same request: Ctrl-C and schedulers signal every process,
        # and torchrun then passes its own copy on to the workers.

    def agreed(self):
        """True on every rank when any rank got a signal (ranks must stop at the same step or DDP
        hangs)."""
        flag = torch.tensor([1.0 if self.received else 0.0], device=_DIST.device)
        if torch_dist.is_initialized():
            torch_dist.all_reduce(flag, op=torch_dist.ReduceOp.MAX)
        if flag.item() > 0 and self.received is None:
            self.received = "SIGTERM"
        return flag.item() > 0

    def exit_if_received(self):
        if self.received:
            cleanup_distributed()
            sys.exit(128 + int(getattr(signal, self.received)))


def check_finite(step, terms, checkpoint):
    """Average the loss terms over ranks, read them on the host, stop training if any is NaN or
    infinite.

    Returns {name: float}. Called every log_every steps and before every checkpoint, so a checkpoint
    never holds weights produced by a non-finite loss.
    """
    names = list(terms)
    values = all_reduce_mean(torch.stack([terms[name].detach().float() for name in names])).tolist()
    bad = [f"{name} = {value}" for name, value in zip(names, values) if not math.isfinite(value)]
    if bad:
        raise TrainingError(f"non-finite loss at step {step}: {', '.join(bad)}; "
                            f"last good checkpoint kept: {checkpoint}")
    return dict(zip(names, values))


# --------------------------------------------------------------------------------------------------
# Logging and timing: tqdm on rank 0, JSON lines, resolved config, images/s and data wait
# --------------------------------------------------------------------------------------------------

class MetricsLog:
    """Append one JSON object per line to `path` (rank 0 only)."""

    def __init__(self, path, enabled):
        self.path, self.enabled = Path(path), enabled

    def write(self, **record):
        if self.enabled:
            record = {key: (round(value, 6) if isinstance(value, float) else value)
                      for key, value in record.items()}
            with open(self.path, "a") as handle:
                handle.write(json.dumps(record) + "\n")


def progress(iterable, enabled, **kwargs):
    from tqdm import tqdm

    return tqdm(iterable, disable=not enabled, dynamic_ncols=True, **kwargs)


def print_run_header(name, cfg, dist, extra=None):
    print0(f"{name}: torch {torch.__version__}, device {dist.device}, world size "
           f"{dist.world_size}, precision {describe_precision(dist.device, cfg.precision)}")
    for key, value in config_dict(cfg).items():
        print0(f"  {key:<22} {value}")
    for key, value in (extra or {}).items():
        print0(f"  {key:<22} {value}  (derived)")


class Timer:
    """images/s and the fraction of time spent waiting for data (see timed), over a window; syncs
    CUDA only when read."""

    def __init__(self, device):
        self.device, self.start = device, time.perf_counter()
        self.images, self.data_seconds = 0, 0.0

    def add(self, images):
        self.images += images

    def rate(self):
        """Returns (images per second, data-wait fraction) since the last call."""
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        now = time.perf_counter()
        elapsed = max(now - self.start, 1e-9)
        result = (self.images / elapsed, self.data_seconds / elapsed)
        self.start, self.images, self.data_seconds = now, 0, 0.0
        return result


def timed(loader, timer):
    """Wrap a loader so that the time spent waiting for the next batch is counted as data wait."""
    iterator = iter(loader)
    while True:
        start = time.perf_counter()
        try:
            batch = next(iterator)
        except StopIteration:
            return
        timer.data_seconds += time.perf_counter() - start
        yield batch


# --------------------------------------------------------------------------------------------------
# kNN monitor and feature extraction (weighted kNN, k=200, T=0.1, cosine; Wu et al. 2018
# "Unsupervised feature learning via non-parametric instance discrimination", Sec. 3.4)
# --------------------------------------------------------------------------------------------------

@torch.no_grad()
def extract_features(backbone, loader, image_size, stage="res5", autocast_dtype=None,
                     memory_format=None, show_progress=False):
    """Global-average-pooled features of one stage for every batch of `loader`, gathered over ranks.

    Returns (features N x C float32, labels N) on the loader's device, identical on every rank.
    """
    was_training = backbone.training
    backbone.eval()
    features, labels = [], []
    for images, targets in progress(loader, show_progress and is_main(), desc=f"features {stage}",
                                    leave=False):
        x = eval_transform(images, image_size)
        if memory_format is not None:
            x = x.contiguous(memory_format=memory_format)
        with torch.autocast(x.device.type, dtype=autocast_dtype or torch.bfloat16,
                            enabled=autocast_dtype is not None):
            maps = backbone(x, last_stage=stage)
        features.append(global_pool(maps[stage]).float())
        labels.append(targets)
    backbone.train(was_training)
    features, labels = torch.cat(features), torch.cat(labels)
    return gather_ragged(features), gather_ragged(labels)


@torch.no_grad()
def knn_predict(bank, bank_labels, queries, k=200, temperature=0.1, num_classes=None, chunk=1024):
    """Weighted kNN (InstDisc rule): top-k cosine neighbours vote with weight exp(sim / T). Returns
    (pred, scores)."""
    num_classes = num_classes or int(bank_labels.max()) + 1
    k = min(k, bank.shape[0])
    bank = F.normalize(bank, dim=1)
    predictions, all_scores = [], []
    for start in range(0, queries.shape[0], chunk):
        q = F.normalize(queries[start:start + chunk], dim=1)
        sims, index = (q @ bank.T).topk(k, dim=1)
        weights = (sims / temperature).exp()
        votes = torch.zeros(q.shape[0], num_classes, device=q.device)
        votes.scatter_add_(1, bank_labels[index], weights)
        predictions.append(votes.argmax(dim=1))
        all_scores.append(votes)
    return torch.cat(predictions), torch.cat(all_scores)


def knn_accuracy(train_features, train_labels, val_features, val_labels, k=200, temperature=0.1):
    predictions, _ = knn_predict(train_features, train_labels, val_features, k, temperature,
                                 int(max(train_labels.max(), val_labels.max())) + 1)
    return (predictions == val_labels).float().mean().item() * 100


def knn_monitor(backbone, train_loader, val_loader, image_size, autocast_dtype=None,
                memory_format=None):
    """kNN top-1 (%) of res5 features: bank = train set, queries = val set."""
    bank, bank_labels = extract_features(backbone, train_loader, image_size, "res5",
                                         autocast_dtype, memory_format)
    queries, query_labels = extract_features(backbone, val_loader, image_size, "res5",
                                             autocast_dtype, memory_format)
    return knn_accuracy(bank, bank_labels, queries, query_labels)


# --------------------------------------------------------------------------------------------------
# Dense labels and mIoU: per-pixel label maps (built-in masks and segmentation scenes, Pascal VOC,
# image/mask folders) and confusion-matrix scores, Hungarian-matched for an unsupervised segmenter:
# for eval_linear.py --dense and densesiam.py --task seg
# --------------------------------------------------------------------------------------------------

IGNORE_LABEL = 255  # no loss or score counts it (VOC's object borders, COCO-Stuff's unlabelled)
VOC_CLASS_NAMES = (  # Pascal VOC's label ids 0-20, in the devkit's order
    "background", "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair",
    "cow", "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa",
    "train", "tvmonitor")


class SegmentationPairs(torch.utils.data.Dataset):
    """(image file, label PNG) pairs as (image uint8 3 x L x L, label int64 L x L), L = size:
    shorter side resized to L (the image antialiased, the label nearest), then the centre square.

    A label PNG holds one class id per pixel: single-channel (mode L), or a palette PNG (mode P,
    Pascal VOC's: the palette index is the class, its colour only displays it); 255 = ignore. An
    RGB label image is refused: its colours are no class ids.
    """

    def __init__(self, pairs, size):
        self.pairs, self.size = pairs, size

    def __len__(self):
        return len(self.pairs)

    def __getitem__(self, index):
        from PIL import Image, UnidentifiedImageError

        image_path, label_path = self.pairs[index]
        try:
            with Image.open(image_path) as image:
                image = TF.pil_to_tensor(image.convert("RGB"))
            with Image.open(label_path) as label:
                if label.mode in ("RGB", "RGBA"):
                    raise InputError(f"{label_path}: an {label.mode} label image; a label PNG "
                                     f"holds a class id per pixel (mode L, or P: index = class)")
                label = TF.pil_to_tensor(label)[:1]                   # 1 x H x W
        except (OSError, UnidentifiedImageError, SyntaxError) as error:
            raise InputError(f"cannot decode {image_path} or its label: {error}") from None
        if image.shape[-2:] != label.shape[-2:]:
            raise InputError(f"{label_path}: size {tuple(label.shape[-2:])} differs from its image "
                             f"{tuple(image.shape[-2:])}")
        image = TF.center_crop(TF.resize(image, self.size, antialias=True), self.size)
        label = TF.resize(label, self.size, interpolation=TF.InterpolationMode.NEAREST)
        return image, TF.center_crop(label, self.size)[0].long()


def paired_files(image_dir, label_dir, data, layout):
    """[(image, label)]: every .jpg/.jpeg/.png of image_dir, sorted, with label_dir/<its stem>.png.
    One line naming `layout` when a folder, every image or some label is missing."""
    for folder in (image_dir, label_dir):
        if not folder.is_dir():
            raise InputError(f"--data {data}: expected folder {folder} (layout: {layout})")
    pairs = [(path, label_dir / (path.stem + ".png")) for path in sorted(image_dir.iterdir())
             if path.suffix.lower() in IMAGE_SUFFIXES]
    if not pairs:
        raise InputError(f"--data {data}: no images in {image_dir}")
    missing = [str(label) for _, label in pairs if not label.is_file()]
    if missing:
        raise InputError(f"--data {data}: {len(missing)} images have no label PNG, "
                         f"e.g. {missing[0]}")
    return pairs


# The folder layouts with per-pixel labels (split: train or val; NAME: the same in both folders)
DENSE_LAYOUTS = {
    "voc": "JPEGImages/NAME.jpg, SegmentationClass/NAME.png, ImageSets/Segmentation/<split>.txt",
    "folders": "<split>/images/NAME.jpg|png, <split>/masks/NAME.png",
    "cocostuff": "images/<split>/NAME.jpg|png, labels/<split>/NAME.png (what cocostuff.py writes)",
}


def dense_layout(data):
    """"synthetic", the DENSE_LAYOUTS key of a --data folder, or None (no per-pixel labels)."""
    root = Path(data)
    if data == "synthetic":
        return "synthetic"
    if (root / "ImageSets" / "Segmentation").is_dir():
        return "voc"
    if (root / "train" / "images").is_dir() or (root / "val" / "images").is_dir():
        return "folders"
    if (root / "images").is_dir() and (root / "labels").is_dir():
        return "cocostuff"
    return None


def segmentation_pairs(data, split, layout=None):
    """[(image path, label PNG path)] of one split of a folder in one of the DENSE_LAYOUTS (the
    given layout, else the one dense_layout finds)."""
    root, layout = Path(data), layout or dense_layout(data)
    if layout == "voc":
        names_file = root / "ImageSets" / "Segmentation" / f"{split}.txt"
        if not names_file.is_file():
            raise InputError(f"--data {data}: no {names_file} (layout: {DENSE_LAYOUTS['voc']})")
        names = [line.strip() for line in names_file.read_text().splitlines() if line.strip()]
        pairs = [(root / "JPEGImages" / f"{name}.jpg", root / "SegmentationClass" / f"{name}.png")
                 for name in names]
        missing = [str(path) for pair in pairs for path in pair if not path.is_file()]
        if missing or not pairs:
            found = f"{len(missing)} files missing, e.g. {missing[0]}" if missing else "none"
            raise InputError(f"--data {data}: {names_file} lists {len(names)} images, {found}")
        return pairs
    if layout == "folders":
        return paired_files(root / split / "images", root / split / "masks", data,
                            DENSE_LAYOUTS["folders"])
    if layout == "cocostuff":
        return paired_files(root / "images" / split, root / "labels" / split, data,
                            DENSE_LAYOUTS["cocostuff"])
    raise InputError(f"--data {data} has no per-pixel labels: give 'synthetic' or a folder laid "
                     f"out as " + "; or ".join(DENSE_LAYOUTS.values()))


def dense_num_classes(data):
    """Classes of a per-pixel-labelled set: 11 built in (SYNTHETIC_CLASSES), 21 for Pascal VOC, else
    1 + the largest label (not 255) of the train and val label PNGs, reading each of them once."""
    layout = dense_layout(data)
    if layout == "synthetic":
        return len(SYNTHETIC_CLASSES)
    if layout == "voc":
        return len(VOC_CLASS_NAMES)
    import numpy as np
    from PIL import Image

    largest = -1
    for split in ("train", "val"):
        for _, label_path in segmentation_pairs(data, split):
            with Image.open(label_path) as label:
                values = np.unique(np.asarray(label))
            values = values[values != IGNORE_LABEL]
            largest = max(largest, int(values.max()) if values.size else -1)
    if largest < 0:
        raise InputError(f"--data {data}: every pixel of every label PNG is {IGNORE_LABEL}")
    return largest + 1


def _class_appearance(num_classes):
    """Fixed per-class colour (evenly spaced hues) and stripe texture (angle, frequency), the same
    in every split."""
    classes = torch.arange(num_classes, dtype=torch.float32)
    hue = classes / num_classes
    phases = torch.tensor([0.0, 1 / 3, 2 / 3])
    colour = 0.5 + 0.35 * torch.cos(2 * math.pi * (hue[:, None] + phases))  # C x 3
    angle = math.pi * ((classes * 0.37) % 1.0)
    frequency = 3.0 + 2.0 * (classes % 3)                # stripe cycles per image width
    return colour, angle, frequency


def make_synthetic_segmentation(num_images, image_size=64, seed=0, num_things=3, num_stuff=3):
    """Built-in segmentation scenes: blobby "stuff" regions covering the image plus one or two
    "thing" shapes on top.

    Every class has a fixed appearance (its own hue and stripe orientation/frequency), so classes
    are recognisable from local colour and texture, which is what unsupervised segmentation can
    discover; per-image nuisances (brightness, colour shift, stripe phase, noise, layout) vary.
    Classes 0..num_things-1 are things, the rest stuff (COCO-Stuff-27 also lists its 12 things
    first). Deterministic from `seed`.
    NOTE: make_synthetic's digits are one shape per image on black, told apart by shape alone;
    unsupervised segmentation needs several classes per image that look alike in every image,
    hence this generator.
    Returns (images N x 3 x S x S uint8, labels N x S x S int64 in [0, num_things + num_stuff)).
    """
    g = dict(generator=torch.Generator().manual_seed(seed))
    n, s, num_classes = num_images, image_size, num_things + num_stuff
    coords = (torch.arange(s, dtype=torch.float32) + 0.5) / s * 2 - 1
    yy, xx = torch.meshgrid(coords, coords, indexing="ij")                 # S x S
    # stuff: one smooth random field per stuff class; each pixel takes the largest
    fields = F.interpolate(torch.rand(n, num_stuff, 3, 3, **g), size=(s, s), mode="bicubic",
                           align_corners=False)
    labels = num_things + fields.argmax(dim=1)                             # N x S x S
    # things: one shape per image, a second one half of the time (disc, square or diamond)
    for index in range(2):
        present = torch.rand(n, 1, 1, **g) < (1.0 if index == 0 else 0.5)
        thing = torch.randint(0, num_things, (n, 1, 1), **g)
        kind = torch.randint(0, 3, (n, 1, 1), **g)
        radius = 0.2 + 0.2 * torch.rand(n, 1, 1, **g)
        cx, cy = (torch.rand(n, 1, 1, **g) * 2 - 1) * 0.7, (torch.rand(n, 1, 1, **g) * 2 - 1) * 0.7
        dx, dy = (xx - cx).abs(), (yy - cy).abs()
        inside = torch.where(kind == 0, dx ** 2 + dy ** 2 < radius ** 2,
                             torch.where(kind == 1, torch.maximum(dx, dy) < radius * 0.85,
                                         dx + dy < radius * 1.2))
        labels = torch.where(present & inside, thing, labels)
    # appearance: class colour (shifted per image) + class stripes (random phase per image) + noise
    colour, angle, frequency = _class_appearance(num_classes)
    shift = 0.08 * (torch.rand(n, num_classes, 3, **g) * 2 - 1)             # N x C x 3
    phase = 2 * math.pi * torch.rand(n, num_classes, **g)                   # N x C
    rows = torch.arange(n)[:, None, None]
    pixel_colour = (colour[labels] + shift[rows, labels]).permute(0, 3, 1, 2)   # N x 3 x S x S
    direction = xx * torch.cos(angle[labels]) + yy * torch.sin(angle[labels])   # N x S x S
    stripes = torch.sin(math.pi * frequency[labels] * direction + phase[rows, labels])
    brightness = 0.8 + 0.4 * torch.rand(n, 1, 1, 1, **g)
    noise = 0.03 * torch.randn(n, 3, s, s, **g)
    images = (pixel_colour + 0.12 * stripes.unsqueeze(1)) * brightness + noise
    return (images.clamp(0, 1) * 255).round().to(torch.uint8), labels


def make_dense_loader(data, split, size, batch_per_rank, dist, seed, workers=8, shuffle=True,
                      drop_last=True, synthetic_size=2560, classes=None, layout=None):
    """Loader yielding (images uint8 B x 3 x S x S, labels int64 B x S x S) on the device, S = size.

    "synthetic": load_dataset's built-in split, generated at `size`, with make_synthetic's part
    masks; with classes=(things, stuff), make_synthetic_segmentation's scenes instead (val: a
    quarter of synthetic_size, at least 8). A folder: one of the DENSE_LAYOUTS (`layout`, else
    the one dense_layout finds), read by SegmentationPairs (resize, centre square).
    """
    if data == "synthetic":
        if classes is None:
            n_val = max(synthetic_size, 10)  # as load_dataset
            images, _, labels = make_synthetic(synthetic_size + n_val, size, seed=12345,
                                               with_masks=True)
        else:
            n_val = max(synthetic_size // 4, 8)
            images, labels = make_synthetic_segmentation(synthetic_size + n_val, size, 12345,
                                                         *classes)
        part = slice(0, synthetic_size) if split == "train" else slice(synthetic_size, None)
        loader = TensorLoader(images[part].to(dist.device), labels[part].to(dist.device),
                              batch_per_rank, dist.rank, dist.world_size, seed, shuffle, drop_last)
    else:
        dataset = SegmentationPairs(segmentation_pairs(data, split, layout), size)
        loader = FolderLoader(dataset, batch_per_rank, dist.rank, dist.world_size, seed,
                              dist.device, workers, shuffle, drop_last)
    if len(loader) == 0:
        raise InputError(f"--data {data} ({split}): fewer images than one batch of "
                         f"{batch_per_rank} per rank x {dist.world_size} ranks")
    return loader


def confusion_matrix(pred, target, num_classes, ignore_index=IGNORE_LABEL):
    """num_classes x num_classes pixel counts, rows = ground-truth class, columns = predicted class
    (an unsupervised segmenter's: cluster). Pixels labelled ignore_index are left out."""
    keep = target != ignore_index
    index = target[keep].long() * num_classes + pred[keep].long()
    return torch.bincount(index, minlength=num_classes * num_classes).view(num_classes, num_classes)


def mean_iou(matched, present):
    """mIoU of a square class x class matrix (rows ground truth, columns prediction): per class
    IoU = tp / (row + column - tp), 0 where that union is empty; mean over the `present` classes."""
    true_pos = matched.diag()
    union = matched.sum(0) + matched.sum(1) - true_pos
    return (true_pos / union.clamp(min=1))[present].mean().item()


def segmentation_iou(confusion):
    """Scores of a class x class confusion matrix summed over every val pixel (rows ground truth,
    columns the predicted class): IoU_c = TP / (TP + FP + FN) = C[c, c] / (row c + col c - C[c, c]).

    mIoU averages IoU_c over the classes present in the labels or the predictions (union > 0): a
    class predicted but in no label counts with IoU 0, a class in neither is left out (the nanmean
    of mmsegmentation; on Pascal VOC val every class is present, so it is the devkit's mean).
    Returns dict(miou, iou: per class, NaN where absent, pixel_acc), fractions in [0, 1].
    """
    confusion = confusion.double().cpu()
    true_pos = confusion.diag()
    union = confusion.sum(0) + confusion.sum(1) - true_pos
    present = union > 0
    iou = torch.where(present, true_pos / union.clamp(min=1), torch.full_like(true_pos, math.nan))
    return dict(miou=mean_iou(confusion, present), iou=iou.tolist(),
                pixel_acc=(true_pos.sum() / confusion.sum().clamp(min=1)).item())


def _hungarian_python(cost):
    """Minimum-cost perfect assignment of a square cost matrix (list of lists): Kuhn-Munkres with
    row/column potentials and shortest augmenting paths, O(n^3). Returns the column of every row."""
    n, inf = len(cost), float("inf")
    row_pot, col_pot = [0.0] * (n + 1), [0.0] * (n + 1)
    row_of_col, prev_col = [0] * (n + 1), [0] * (n + 1)  # 1-based; column 0 is a virtual start
    for row in range(1, n + 1):
        row_of_col[0], col = row, 0
        min_slack, used = [inf] * (n + 1), [False] * (n + 1)
        while True:                                       # grow the tree until a free column
            used[col] = True
            current_row, delta, next_col = row_of_col[col], inf, 0
            for j in range(1, n + 1):
                if used[j]:
                    continue
                slack = cost[current_row - 1][j - 1] - row_pot[current_row] - col_pot[j]
                if slack < min_slack[j]:
                    min_slack[j], prev_col[j] = slack, col
                if min_slack[j] < delta:
                    delta, next_col = min_slack[j], j
            for j in range(n + 1):
                if used[j]:
                    row_pot[row_of_col[j]] += delta
                    col_pot[j] -= delta
                else:
                    min_slack[j] -= delta
            col = next_col
            if row_of_col[col] == 0:
                break
        while col:                                        # flip the augmenting path
            previous = prev_col[col]
            row_of_col[col] = row_of_col[previous]
            col = previous
    assignment = [0] * n
    for j in range(1, n + 1):
        assignment[row_of_col[j] - 1] = j - 1
    return assignment


def linear_assignment(cost):
    """Row -> column minimum-cost assignment of a square matrix: scipy when installed (an optional
    extra), else the pure-Python Kuhn-Munkres above (exact; well under a second for the 27 classes
    of COCO-Stuff)."""
    cost = torch.as_tensor(cost, dtype=torch.float64).cpu()
    try:
        from scipy.optimize import linear_sum_assignment
    except ImportError:
        return torch.tensor(_hungarian_python(cost.tolist()))
    rows, cols = linear_sum_assignment(cost.numpy())
    return torch.as_tensor(cols)[torch.as_tensor(rows).argsort()]


def matched_segmentation_iou(confusion, thing_classes=()):
    """segmentation_iou of an unsupervised segmenter (confusion columns: its clusters) after
    matching clusters to classes one-to-one, maximising the matched pixels (Hungarian).

    Adds cluster_to_class (cluster k is read as that class) and, given thing_classes,
    miou_things / miou_stuff (mIoU^Th / mIoU^St, DenseSiam Table 3) as the released evaluator
    computes them (ZwwWayne/DenseSiam densesiam/core/evaluators/cluster_mIoU_evaluator.py,
    evaluate(); the same as PiCIE's commons.py evaluate()): the SAME matching as miou, then the
    mIoU of the things x things and stuff x stuff blocks of the matched matrix. A thing pixel
    predicted as a stuff class counts against neither group, so both can exceed the overall mIoU
    (Table 3: 16.4 overall with 24.5 stuff and 29.5 things).
    NOTE: the released code permutes the ROWS of the confusion matrix into cluster order and takes
    its first 12 rows and columns: the classes matched to clusters 0-11, which depends on the
    network's arbitrary channel order (its comment says "re-ordered to 12 thing + 15 stuff
    classes"). We take the thing and stuff classes' blocks, as that comment and the paper
    (Sec. 5.1, "mean IoU of stuff and things classes") intend.
    NOTE: a present class whose block row and column are empty (all its pixels predicted as the
    other group, its cluster used only there) scores IoU 0 here; the released nanmean skips it."""
    confusion = confusion.double().cpu()
    cluster_to_class = linear_assignment(confusion.max() - confusion.t())  # rows: clusters
    matched = torch.zeros_like(confusion)
    matched[:, cluster_to_class] = confusion              # predicted cluster k -> its class column
    scores = dict(segmentation_iou(matched), cluster_to_class=cluster_to_class)
    if len(thing_classes):
        present = (matched.sum(0) + matched.sum(1)) > 0   # in the labels or matched predictions
        is_thing = torch.zeros(len(matched), dtype=torch.bool)
        is_thing[list(thing_classes)] = True
        for name, group in (("miou_things", is_thing), ("miou_stuff", ~is_thing)):
            scores[name] = mean_iou(matched[group][:, group], present[group])
    return scores


# ---- DenseSiam --task seg (densesiam.py): its views, loaders and evaluation ----
# Views: photometric copies of the whole image, then one shared square crop (DenseSiam Sec. 4).
# Released code (ZwwWayne/DenseSiam): brightness/contrast/saturation 0.3, hue 0.1, each p 0.8;
# gray 0.2; blur p 0.5. NOTE: color_augment applies the four jitters together with p 0.8 in random
# order, the released code draws each with its own p 0.8 in a fixed order. The crop of the recipe
# is unused (the seg geometry is shared). Blur: the released config blurs the 640 px image with
# sigma in [0.1, 2] px (ReplayRandomGaussianBlur). ViewRecipe's sigma is in px at 224 px, scaled
# with the image side, hence [0.1, 2] * 224 / 640: [0.1, 2] px at 640 px, the same fraction of the
# image at any --load-size. NOTE: the released transform takes the radius from the uniform draw that
# decided to blur, so it is |U(-1.8, 0.1)| <= 1.8 px; we draw the config's [0.1, 2] px.
SEG_PHOTOMETRIC = ViewRecipe(jitter=(0.3, 0.3, 0.3, 0.1), jitter_p=0.8, gray_p=0.2, blur_p=0.5,
                             blur_sigma=(0.1 * 224 / 640, 2.0 * 224 / 640))


def replay_crop(side_fraction, top_fraction, left_fraction, size):
    """The released seg code's square crop of a size x size map from fractions (tensors) ->
    (side, top, left): side = floor(s * size), top = round((size - side) * a),
    left = round((size - side) * b), rounding half to even like Python's round. In float64, to
    match the released numbers (test_d5_replay_crop)."""
    side = torch.floor(side_fraction.double() * size)
    return (side, torch.round((size - side) * top_fraction.double()),
            torch.round((size - side) * left_fraction.double()))


def seg_crop_boxes(batch, size, scale, generator, device):
    """Seg mode's shared geometric transform: one square crop (side fraction in `scale`) and one
    flip (p 0.5) per image, as edge-based normalised boxes of the size x size input.

    NOTE: the released code rounds the crop separately for the 640 px image (view 1) and the 80 px
    feature map (view 2), so the two are only aligned to within half a feature cell
    (test_d5_replay_crop). We round once, on the image, and crop the feature map with the same
    normalised box (float32 geometry even under autocast, see crop_resize), which aligns them
    exactly. It also draws each image's crop and colour jitter once for the whole run (replay); we
    draw new ones every step (the colour in SEG_PHOTOMETRIC's color_augment)."""
    u = torch.rand(batch, 4, generator=generator, device=device)
    side_fraction = scale[0] + (scale[1] - scale[0]) * u[:, 0]
    side, top, left = replay_crop(side_fraction, u[:, 1], u[:, 2], size)
    boxes = torch.stack([left, top, left + side, top + side], dim=1) / size
    return boxes.float(), u[:, 3] < 0.5


def seg_views(colour1, colour2, boxes, flips, size):
    """The two seg-mode views (normalised, B x 3 x size x size) of photometric copies colour1/2.

    View 1 = crop (boxes, flips) of colour1 resized to size; view 2 = all of colour2 resized to
    size. Both go through the same antialiased resize (antialiased_crop_resize).
    NOTE: the released code shrinks view 1 with F.interpolate, without antialiasing
    (ReplayRandomResizedCrop in densesiam/datasets/pipelines/index_transforms.py), and view 2 with
    PIL's resize, which antialiases (densesiam/datasets/cluster_replay_dataset.py); the val images
    are PIL-resized too. We antialias both views."""
    whole = boxes.new_zeros(len(boxes), 4)
    whole[:, 2:] = 1.0  # (0, 0, 1, 1): the whole image
    view1 = antialiased_crop_resize(colour1, boxes, flips, size)
    view2 = antialiased_crop_resize(colour2, whole, torch.zeros_like(flips), size)
    return normalize(view1), normalize(view2)


def make_seg_loaders(cfg, dist, batch_per_rank, load_size, eval_size):
    """Seg mode's loaders of (images uint8, labels int64) on the device: training images at
    load_size px (the views are cut from them), val images and labels at eval_size px, as the
    released evaluation resizes them (bilinear, nearest) to 320 px and scores there
    (ZwwWayne/DenseSiam densesiam/datasets/coco_eval_dataset.py; res=320 in the config). Built in:
    make_synthetic_segmentation's scenes of the config's classes; a folder: the COCO-Stuff layout
    cocostuff.py writes (things first, as --num-things counts them)."""
    data = dict(synthetic_size=cfg.synthetic_size, layout="cocostuff",
                classes=(cfg.num_things, cfg.num_classes - cfg.num_things))
    train_loader = make_dense_loader(cfg.data, "train", load_size, batch_per_rank, dist, cfg.seed,
                                     cfg.workers, **data)
    val_batch = max(1, min(64, batch_per_rank))
    val_loader = make_dense_loader(cfg.data, "val", eval_size, val_batch, dist, cfg.seed,
                                   cfg.workers, shuffle=False, drop_last=False, **data)
    return train_loader, val_loader


@torch.no_grad()
def evaluate_segmentation(model, loader, num_classes, num_things, eval_size, autocast_dtype=None):
    """argmax of g(f(x)) upsampled (bilinear) to the label size, one confusion matrix over the val
    set and ranks, scored after Hungarian matching (matched_segmentation_iou)."""
    was_training = model.training
    model.eval()
    confusion = torch.zeros(num_classes, num_classes, dtype=torch.long,
                            device=next(model.parameters()).device)
    for images, labels in loader:
        x = eval_transform(images, eval_size)
        with torch.autocast(x.device.type, dtype=autocast_dtype or torch.bfloat16,
                            enabled=autocast_dtype is not None):
            logits = model.segment(x)
        logits = F.interpolate(logits.float(), size=labels.shape[-2:], mode="bilinear",
                               align_corners=False)
        confusion += confusion_matrix(logits.argmax(dim=1), labels, num_classes)
    if torch_dist.is_initialized():
        torch_dist.all_reduce(confusion)
    model.train(was_training)
    return matched_segmentation_iou(confusion, range(num_things))



# --------------------------------------------------------------------------------------------------
# Pictures: `python <method>.py --show` writes <out>/show.png, what the method does on one batch.
# The method file's show() picks what to draw; these helpers draw it (torchvision.utils on uint8
# 3 x H x W pictures, no matplotlib). Points and boxes are in augment's coordinates: (x, y) in
# [0, 1] of a picture, edge-based (0 and 1 are its outer edges).
# --------------------------------------------------------------------------------------------------

PANEL = 128  # px of every panel: inputs are enlarged (nearest), so boxes and labels stay readable
COLOURS = ("yellow", "cyan", "magenta", "lime", "orange", "white", "red", "blueviolet")


def show_batch(cfg, dist, count=4):
    """The first `count` images of the first training batch (uint8, on the device) and the
    augmentation generator of step 0."""
    loader = make_loader(cfg.data, "train", cfg.image_size, count, dist, cfg.seed, cfg.workers,
                         synthetic_size=cfg.synthetic_size, load_size=load_size_of(cfg),
                         decode_on_device=cfg.gpu_decode)
    images, _ = next(iter(loader))
    return images, step_generator(dist.device, cfg.seed, dist.rank, 0)


def to_uint8(views):
    """Normalised views (augment's output, B x 3 x S x S) -> their uint8 pixels, on the CPU."""
    mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    return (views.detach().float().cpu() * std + mean).clamp(0, 1).mul(255).round().to(torch.uint8)


def enlarge(images, size=PANEL, brightness=1.0):
    """uint8 B x 3 x h x w -> B x 3 x size x size on the CPU, nearest: every input pixel a visible
    block. Dimmed (brightness < 1), an image lets the boxes drawn on it stand out."""
    images = F.interpolate(images.cpu(), size=(size, size), mode="nearest")
    return images if brightness == 1 else images.mul(brightness).round().to(torch.uint8)


def box_pixels(boxes, size):
    """Normalised boxes N x 4 (x0, y0, x1, y1) -> the rectangles draw_bounding_boxes outlines on a
    size x size picture: the first and last pixel column and row inside each box."""
    boxes = boxes.detach().float().cpu() * size
    return torch.cat([boxes[:, :2].round(), boxes[:, 2:].round() - 1], dim=1)


def draw_boxes(picture, boxes, labels=None, colours=COLOURS, width=2, fill=False):
    """Outline N boxes (N x 4, normalised) on a uint8 picture, box n in colours[n % len] (and
    shaded in it, with fill)."""
    colours = [colours[n % len(colours)] for n in range(len(boxes))]
    return torchvision.utils.draw_bounding_boxes(picture, box_pixels(boxes, picture.shape[-1]),
                                                 labels=labels, colors=colours, width=width,
                                                 fill=fill)


def draw_points(picture, points, colour="yellow", radius=2, connectivity=None, width=1):
    """Dots at points K x N x 2 ((x, y), normalised: K sets of N points), joined within each set
    by the lines in connectivity (pairs of point indices)."""
    pixels = points.detach().float().cpu() * picture.shape[-1] - 0.5  # PIL: pixel i's centre at i
    return torchvision.utils.draw_keypoints(picture, pixels, connectivity=connectivity,
                                            colors=colour, radius=radius, width=width)


def spotlight(picture, weights):
    """Dim a uint8 picture where weights (h x w, enlarged nearest) are low, stretched from the
    smallest weight (x 0.15) to the largest (x 1): where a map puts its weight, not how much."""
    weights = weights.detach().float().cpu()[None, None]
    weights = F.interpolate(weights, size=picture.shape[-2:], mode="nearest")[0]
    weights = (weights - weights.min()) / (weights.max() - weights.min()).clamp(min=1e-12)
    return (picture.float() * (0.15 + 0.85 * weights)).round().to(torch.uint8)


def cell_centres(height, width):
    """Centres of the cells of a height x width map that covers a view edge to edge: HW x 2
    (x, y), row-major (the order of a flattened B x C x H x W map)."""
    ys, xs = torch.meshgrid((torch.arange(height) + 0.5) / height,
                            (torch.arange(width) + 0.5) / width, indexing="ij")
    return torch.stack([xs.flatten(), ys.flatten()], dim=1)


def view_to_image(points, boxes, flips):
    """Points of views (B x N x 2, normalised) -> the same points of the images they came from.

    crop_resize's map, inverted: view column s shows image column x0 + s (x1 - x0), or
    x0 + (1 - s) (x1 - x0) in a mirrored view; rows likewise, never mirrored."""
    boxes, flips = boxes.detach().float().cpu(), flips.cpu()
    x0, y0, x1, y1 = (boxes[:, i].view(-1, 1) for i in range(4))
    s = torch.where(flips.view(-1, 1), 1 - points[..., 0], points[..., 0])
    return torch.stack([x0 + s * (x1 - x0), y0 + points[..., 1] * (y1 - y0)], dim=-1)


def draw_matches(images, index, size, boxes, flips):
    """Per image, dense matches drawn on it: every position of view 1's h x w map (red dot) joined
    by a line to the position of view 2's map that index (B x hw, dense_match's) sends it to.
    size = (h, w) of both maps; boxes, flips: augment's, of views 1 and 2."""
    centres = cell_centres(*size).expand(len(index), -1, -1)                # B x hw x 2
    starts = view_to_image(centres, boxes[0], flips[0])
    ends = view_to_image(centres, boxes[1], flips[1])
    ends = ends.gather(1, index.cpu()[..., None].expand(-1, -1, 2))        # the matched positions
    panels = []
    for i, picture in enumerate(enlarge(images, brightness=0.7)):
        picture = draw_boxes(picture, torch.stack([boxes[0][i], boxes[1][i]]), width=1)
        pairs = torch.stack([starts[i], ends[i]], dim=1)                    # hw x 2 x 2
        picture = draw_points(picture, pairs, radius=1, connectivity=[(0, 1)])
        panels.append(draw_points(picture, starts[i][None], colour="red"))
    return panels


def view_rows(images, views, boxes, flips):
    """One row of panels per image: the image (dimmed) with the crop box of every view (box v
    labelled v + 1), then the views, framed in the colour of their box and labelled v + 1, and
    "flip" where the view is mirrored."""
    rows = []
    whole = torch.tensor([[0.0, 0.0, 1.0, 1.0]])
    for i, picture in enumerate(enlarge(images, brightness=0.7)):
        labels = [str(v + 1) for v in range(len(views))]
        rows.append([draw_boxes(picture, torch.stack([box[i] for box in boxes]), labels)])
        for v, (view, flip) in enumerate(zip(views, flips)):
            label = f"{v + 1}" + (" flip" if flip[i] else "")
            panel = enlarge(to_uint8(view[i:i + 1]))[0]
            rows[-1].append(draw_boxes(panel, whole, [label], COLOURS[v:]))
    return rows


def save_picture(rows, path, caption):
    """Lay rows of panels out in one grid (None, or a short row: blank panels) and write it as a
    PNG (rank 0), printing its path and a caption. Returns the path.

    The PNG has a palette of 256 colours (PIL's quantize): a third of the bytes of RGB, so the
    pictures in docs/ stay small; the views' noise and colours survive it visibly unchanged."""
    import PIL.Image

    columns = max(len(row) for row in rows)
    blank = torch.full((3, PANEL, PANEL), 255, dtype=torch.uint8)
    panels = [blank if panel is None else panel
              for row in rows for panel in row + [None] * (columns - len(row))]
    if is_main():
        prepare_output_dir(Path(path).parent)
        grid = torchvision.utils.make_grid(panels, nrow=columns, padding=4, pad_value=255)
        picture = PIL.Image.fromarray(grid.permute(1, 2, 0).numpy())
        picture.quantize(256).save(path, format="PNG", optimize=True)
        print0(f"wrote {path}\n{caption}")
    return str(path)
