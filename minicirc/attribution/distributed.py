"""Data-parallel attribution: the helpers `find_circuit(..., distributed=True)` and `minicirc circuit
--distributed` use (launch with `torchrun --nproc-per-node N`).

Examples are split into contiguous runs of whole batches, one run per rank (`shard`). Each rank computes
node and edge effect *sums* over its own examples (downstream-node selection for edges uses per-(example,
position) effects, which a rank has for its own examples, so no communication is needed there); then
node sums and metric sums are all-reduced (`all_reduce_sum`) and the sparse edge sums are gathered on every
rank (`all_gather_object`) and summed there in rank order, so every rank ends with the same Circuit and
its thresholds and top-k select the same nodes and edges. Only rank 0 writes files and shows progress.

Errors on one rank (a NaN in its shard, a bad file) are agreed on before any reduction (`agree`), so every
rank stops with the same message instead of waiting for a collective that never comes. find_circuit runs
its loop over batches inside `summed_over_ranks`, which does both.
"""
import os
from contextlib import contextmanager
from datetime import timedelta

import torch
import torch.distributed as dist

from ..errors import MinicircError


def _dist():
    """torch.distributed, checked: a torch build without it has the module but none of its functions."""
    if not dist.is_available():
        raise MinicircError("this torch build has no torch.distributed")
    return dist


def launched():
    """Whether this process was started by torchrun (or another launcher that sets the env:// variables)."""
    return all(k in os.environ for k in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"))


def init(device="cpu", timeout_s=None):
    """Join the process group torchrun describes in the environment (gloo on CPU, NCCL on CUDA).

    Returns (rank, world_size, device): with CUDA the device becomes cuda:LOCAL_RANK. Idempotent."""
    dist = _dist()
    if not launched():
        raise MinicircError("--distributed needs the environment torchrun sets (RANK, WORLD_SIZE, MASTER_ADDR, "
                            "MASTER_PORT): launch with `torchrun --nproc-per-node N -m minicirc.cli circuit ... "
                            "--distributed`")
    cuda = str(device).startswith("cuda")
    if cuda:
        local = int(os.environ.get("LOCAL_RANK", 0))
        if local >= torch.cuda.device_count():
            raise MinicircError(f"LOCAL_RANK {local} but this machine has {torch.cuda.device_count()} CUDA devices")
        torch.cuda.set_device(local)
        device = f"cuda:{local}"
    if not dist.is_initialized():
        timeout = timedelta(seconds=float(timeout_s or os.environ.get("MINICIRC_DIST_TIMEOUT", 1800)))
        backend = "nccl" if cuda else "gloo"
        if cuda and not dist.is_nccl_available():
            raise MinicircError("--device cuda --distributed needs NCCL, which this torch build lacks")
        dist.init_process_group(backend=backend, init_method="env://", timeout=timeout)
    return dist.get_rank(), dist.get_world_size(), device


def finish():
    dist = _dist()
    if dist.is_initialized():
        dist.destroy_process_group()


def group_info(group=None):
    """(rank, world size) of `group` (None: the default group)."""
    dist = _dist()
    if not dist.is_initialized():
        raise MinicircError("distributed=True but no process group is initialised: launch with torchrun and call "
                            "minicirc.attribution.distributed.init() (the CLI's --distributed does)")
    return dist.get_rank(group), dist.get_world_size(group)


def shard(n_batches, rank, world):
    """Contiguous run of batch numbers [lo, hi) for `rank`: sizes differ by at most one, ranks in order."""
    return (rank * n_batches) // world, ((rank + 1) * n_batches) // world


def agree(error, rank, group=None):
    """Collective: raise on every rank if `error` (an exception or None) is set on any rank.

    The failing rank re-raises its own exception; the others raise a MinicircError naming it."""
    dist = _dist()
    msg = None if error is None else (str(error) if isinstance(error, MinicircError)
                                      else f"{type(error).__name__}: {error}")
    msgs = [None] * dist.get_world_size(group)
    dist.all_gather_object(msgs, msg, group=group)
    if error is not None:
        raise error
    failed = [(r, m) for r, m in enumerate(msgs) if m is not None]
    if failed:
        r, m = failed[0]
        raise MinicircError(f"rank {r} failed: {m}")


@contextmanager
def summed_over_ranks(sums, group=None):
    """Around the loop that adds this rank's share to `sums` (an object with a collective `reduce(group)`):
    on leaving, every rank holds the sums over all ranks. An exception on any rank is agreed on first, so
    every rank raises instead of waiting in a reduction the failed rank never joins."""
    rank, _ = group_info(group)
    try:
        yield
    except Exception as e:
        agree(e, rank, group)   # raises e here, and a MinicircError naming this rank on the others
        raise
    agree(None, rank, group)
    sums.reduce(group)


def all_reduce_sum(tensors, group=None):
    """Sum a list of tensors over ranks in place, with one collective (flattened, float64)."""
    dist = _dist()
    if not tensors:
        return tensors
    flat = torch.cat([t.reshape(-1).to(torch.float64) for t in tensors])
    dist.all_reduce(flat, op=dist.ReduceOp.SUM, group=group)
    off = 0
    for t in tensors:
        k = t.numel()
        t.copy_(flat[off:off + k].view(t.shape))
        off += k
    return tensors


def all_gather(obj, group=None):
    """[obj of rank 0, obj of rank 1, ...] on every rank (objects are pickled; keep tensors on CPU)."""
    dist = _dist()
    out = [None] * dist.get_world_size(group)
    dist.all_gather_object(out, obj, group=group)
    return out


def all_gather_sparse(parts, group=None):
    """Gather every rank's sparse edge sums: `parts` is [(pair, keys, linear keys (nnz,) long, values (nnz,)
    float64, rest shape)]; returns one such list per rank, in rank order, on every rank.

    Keys and shapes travel as pickled objects (small); the entries as two flat tensors per rank with one
    all_gather each (pickling millions of entries would dominate the reduction)."""
    dist = _dist()
    world = dist.get_world_size(group)
    nccl = dist.get_backend(group) == "nccl"
    device = torch.device("cuda", torch.cuda.current_device()) if nccl else torch.device("cpu")
    metas = all_gather([(pair, keys, lin.numel(), rest) for pair, keys, lin, _, rest in parts], group)
    sizes = [sum(m[2] for m in ms) for ms in metas]
    longest = max(sizes + [1])

    def gather(flat, dtype):
        buf = torch.zeros(longest, dtype=dtype, device=device)
        buf[:flat.numel()] = flat.to(device)
        out = [torch.empty_like(buf) for _ in range(world)]
        dist.all_gather(out, buf, group=group)
        return out

    lin_all = gather(torch.cat([p[2].reshape(-1) for p in parts]) if parts else torch.zeros(0), torch.long)
    val_all = gather(torch.cat([p[3].reshape(-1) for p in parts]) if parts else torch.zeros(0), torch.float64)
    result = []
    for r, ms in enumerate(metas):
        out, off = [], 0
        for pair, keys, nnz, rest in ms:
            out.append((pair, keys, lin_all[r][off:off + nnz], val_all[r][off:off + nnz], rest))
            off += nnz
        result.append(out)
    return result
