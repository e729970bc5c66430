"""Data-parallel training over torch.distributed, for a model held as a dict of tensors.

Launched by `torchrun` (which sets RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR/PORT), `session()`
joins the process group: backend `nccl` on CUDA (one GPU per process, cuda:LOCAL_RANK), `gloo` on
CPU. Without torchrun (WORLD_SIZE unset or 1) everything here is a cheap no-op, so training code
calls these helpers unconditionally.

No DistributedDataParallel: the LM is a functional dict of tensors, so gradients are all-reduced
explicitly (`all_reduce_grads`, one flat bucket per step). To get exactly the gradient of the
global batch's mean loss, every rank divides its *summed* loss by the *global* token count
(`all_reduce_sum` of its count, before backward) and the gradients are then summed, not averaged.

Collectives must be reached by every rank in the same order: keep control flow identical on all
ranks (decide stop/done/skip from all-reduced values: `any_true`, `max_float`, the guard on the
all-reduced gradient norm).
"""
from __future__ import annotations

import contextlib
import datetime
import io
import os
import sys
from dataclasses import dataclass

import torch
import torch.distributed as dist

from .device import resolve_device


@dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    backend: str = ""  # "" when not distributed

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def env_world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def info() -> DistInfo:
    """This process's place in the current process group (rank 0 of 1 when there is none)."""
    if not (dist.is_available() and dist.is_initialized()):
        return DistInfo()
    return DistInfo(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0")),
                    dist.get_backend())


def rank() -> int:
    return info().rank


def world_size() -> int:
    return info().world_size


def is_main() -> bool:
    return info().is_main


def init_from_env(device_name: str = "auto", timeout_minutes: float = 30.0) -> tuple[DistInfo, torch.device]:
    """Join the process group torchrun describes in the environment and pick this rank's device.

    Returns (info, device). Single process: (DistInfo(), resolve_device(device_name)). If a group is
    already initialised (a caller or test did it), it is reused as is."""
    device = resolve_device(device_name)
    if dist.is_available() and dist.is_initialized():
        d = info()
    elif env_world_size() > 1:
        if device.type == "cuda":
            # one GPU per process; must precede init so NCCL binds the right device
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        backend = "nccl" if device.type == "cuda" else "gloo"
        dist.init_process_group(backend=backend, timeout=datetime.timedelta(minutes=timeout_minutes))
        d = info()
    else:
        return DistInfo(), device
    if device.type == "cuda" and d.enabled:
        device = torch.device("cuda", d.local_rank)
    return d, device


def cleanup() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


@contextlib.contextmanager
def session(device_name: str = "auto"):
    """`with session(cfg.run.device) as (dinfo, device):` — init from env, clean up at exit
    (only what this context initialised)."""
    owned = env_world_size() > 1 and not (dist.is_available() and dist.is_initialized())
    d, device = init_from_env(device_name)
    try:
        yield d, device
    except BaseException:
        if owned:  # no barrier: a rank that failed must not wait for the others (they may never arrive)
            cleanup()
        raise
    if owned:
        # every rank leaves together, so none tears its group down while another still communicates (the
        # abort seen at exit came later, in the interpreter's teardown: see end_launched_process)
        try:
            barrier()
        finally:
            cleanup()


def end_launched_process(rc: int) -> int:
    """Under torchrun (WORLD_SIZE > 1), end this process with exit status `rc` once its output is
    flushed, skipping the interpreter's teardown; otherwise return `rc`.

    Why: a gloo rank whose run had finished, passed the final barrier and destroyed its process group
    was seen, in about one CI run in ten, to abort in that teardown ("terminate called without an
    active exception": a C++ thread object destroyed while still joinable, the crash class of
    pytorch/pytorch#179291). torchrun then reports the finished run as failed and kills the other
    ranks. os._exit skips the C++ static destructors and atexit hooks; nothing is lost, because by
    then every checkpoint is a closed file, the tracker has finished and stdout/stderr are flushed."""
    if env_world_size() <= 1:
        return rc
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):
            stream.flush()
    os._exit(rc)


def barrier() -> None:
    if world_size() > 1:
        dist.barrier()


def _comm_device() -> torch.device:
    """NCCL reduces CUDA tensors only; gloo CPU tensors."""
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


# --- sharding ---------------------------------------------------------------------------------
def shard_slice(n: int, rank: int, world: int) -> slice:
    """Contiguous block of range(n) owned by `rank`: sizes differ by at most one, no overlap,
    the blocks in rank order cover range(n) exactly (same split as torch.tensor_split)."""
    q, r = divmod(n, world)
    start = rank * q + min(rank, r)
    return slice(start, start + q + (1 if rank < r else 0))


def shard(items: list, rank: int, world: int) -> list:
    """items[rank::world]: a disjoint, round-robin share (for evaluation sets)."""
    return list(items[rank::world])


# --- reductions -------------------------------------------------------------------------------
def all_reduce_sum(x):
    """Sum of a number (int/float) or tensor over ranks; returns the same kind it was given."""
    if world_size() == 1:
        return x
    if isinstance(x, torch.Tensor):
        t = x.detach().to(_comm_device()).clone()
        dist.all_reduce(t)
        return t.to(x.device)
    t = torch.tensor(x, dtype=torch.int64 if isinstance(x, int) else torch.float64, device=_comm_device())
    dist.all_reduce(t)
    return type(x)(t.item())


def max_floats(values: list[float]) -> list[float]:
    """Element-wise maximum over ranks, in one collective (e.g. [elapsed minutes, stop flag])."""
    if world_size() == 1:
        return [float(v) for v in values]
    t = torch.tensor([float(v) for v in values], dtype=torch.float64, device=_comm_device())
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return t.tolist()


def max_float(x: float) -> float:
    return max_floats([x])[0]


def any_true(flag: bool) -> bool:
    """True on every rank when it is True on any rank (e.g. a signal reached only some ranks)."""
    return bool(max_float(1.0 if flag else 0.0))


def all_reduce_grads(params, divisor: float = 1.0) -> None:
    """Sum (then divide by `divisor`) every parameter's .grad across ranks, in one flat bucket.

    A parameter without a gradient on some rank (e.g. an adaptive-softmax cluster no target of
    that rank fell into) contributes zeros; it keeps grad None only if no rank has a gradient,
    so the optimizer treats it exactly as a single process over the global batch would."""
    if world_size() == 1:
        if divisor != 1.0:
            for p in params:
                if p.grad is not None:
                    p.grad.div_(divisor)
        return
    params = list(params)
    dev = _comm_device()
    dtype = torch.float64 if any(p.dtype == torch.float64 for p in params) else torch.float32
    has = torch.tensor([p.grad is not None for p in params], dtype=dtype, device=dev)
    flat = torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1).to(dev, dtype)
                      for p in params] + [has])
    dist.all_reduce(flat)
    if divisor != 1.0:
        flat[: -len(params)].div_(divisor)
    offset = 0
    for p, present in zip(params, flat[-len(params):].tolist()):
        n = p.numel()
        if present > 0:
            g = flat[offset:offset + n].view_as(p).to(p.device, p.dtype)
            if p.grad is None:
                p.grad = g.clone()
            else:
                p.grad.copy_(g)
        offset += n


def broadcast_object(obj, src: int = 0):
    """`obj` from rank `src` on every rank (picklable objects: paths, small dicts)."""
    if world_size() == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def gather_objects(obj) -> list:
    """[obj of rank 0, obj of rank 1, ...] on every rank, for checkpoint-style objects (tensors on
    any device, numbers, strings, lists, dicts); tensors come back on the CPU."""
    if world_size() == 1:
        return [obj]
    # serialise with torch.save ourselves: pickling tensors through all_gather_object directly
    # fails to unpickle some storages (uint8 RNG states) in recent torch
    buf = io.BytesIO()
    torch.save(_to_cpu(obj), buf)
    out = [None] * world_size()
    dist.all_gather_object(out, buf.getvalue())
    return [torch.load(io.BytesIO(b), map_location="cpu", weights_only=True) for b in out]


def _to_cpu(obj):
    if isinstance(obj, torch.Tensor):
        return obj.detach().cpu()
    if isinstance(obj, dict):
        return {k: _to_cpu(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_to_cpu(v) for v in obj)
    return obj
