"""Splitting a step's work: over micro-batches (gradient accumulation) and over processes
(data parallel, FSDP), which are the same sum split two ways.

One optimizer step consumes `gradient_accumulation_steps` micro-batches of `batch_size`
examples on each of the `world_size` processes. Its loss is the mean over every target
token of all of them: step.py's `accumulate_gradients` scales each micro-batch by its
share of the step's N target tokens, and the processes sum what they hold (this module).

Processes. Launch with torchrun; train() joins the process group it describes
(WORLD_SIZE, RANK, LOCAL_RANK) over gloo on CPU or nccl on CUDA, and rank 0 writes:

    torchrun --standalone --nproc_per_node 4 my_script.py

Data parallel (the default): process r takes micro-batches r, r + world, ... of each
step. The target count, the summed loss and the gradients of the trainable parameters
are summed by all_reduce, the gradients in one flat buffer (`reduce_gradients`). That is
DDP's arithmetic without its wrapper, so frozen parameters and a trainable set that
changes (gradual unfreezing) need no care; the price is no overlap of communication
with the backward pass.

FSDP (`TrainConfig(fsdp=True)`, for models whose weights, gradients and AdamW moments do
not fit one device): `shard_model` applies torch's FSDP2 `fully_shard` to each
transformer block and then to the whole model, so every process keeps 1/world of each
parameter, gradient and moment. A block's full weights exist only while it runs
(all-gathered for its forward and again for its backward) and its gradients are
reduce-scattered right after its backward. The embeddings, ln_f and lm_head belong to
the root, so the tied lm_head / wte stays one parameter. Two rules follow:
  - FSDP averages gradients over processes by default; minift makes it sum (divide
    factor 1, sum reduction), so the normalisation above holds unchanged.
  - Every process must run the same collectives in the same order: each runs as many
    forward/backward passes as the busiest one; a process with fewer micro-batches (the
    end of an epoch) or a micro-batch without targets runs `idle_pass`, a zero loss.
Checkpoints hold full tensors, gathered one at a time (`gather_to_rank0`), in the same
files as unsharded training, so a run resumes with or without FSDP, on any number of
processes. The model stays sharded after train(); to save it, gather its weights first:
`gather_to_rank0(dict(model.named_parameters()))` (GPT.save_pretrained needs full tensors).
At the end of a script, drop the sharded model and `gc.collect()` before
`torch.distributed.destroy_process_group()`: destroying the group under a live sharded
model aborted a process now and then at exit (gloo, torch 2.13).
"""
from __future__ import annotations

import contextlib
import math
import os
import sys
from typing import Callable

import torch
import torch.distributed as dist
from torch import nn

from .data import IGNORE_INDEX, collate, shuffled_batches
from .machine import default_device


def _loaded(module: str, name: str):
    """`module.name` if `module` is already imported, else () (isinstance(x, ()) is False).

    FSDP2 (torch >= 2.6) turns each parameter of a module it shards into a DTensor. Both are
    imported by shard_model, when first needed: importing them is slow and large (sympy
    comes along), which every `import minift` used to pay, and nothing can be sharded
    before they are imported, so the checks below look them up instead."""
    return getattr(sys.modules.get(module), name, ())


def _is_dtensor(t) -> bool:
    return isinstance(t, _loaded("torch.distributed.tensor", "DTensor"))


def _is_fsdp_module(m) -> bool:
    return isinstance(m, _loaded("torch.distributed.fsdp", "FSDPModule"))


# ----------------------------------------------------------------------------- micro-batches
def count_targets(batch: dict[str, torch.Tensor]) -> int:
    """Target tokens of a collated batch: labels after the shift that are not -100."""
    return int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())


def micro_batch_stream(data, batch_size: int, seed: int, epoch: int = 0, index: int = 0,
                       epochs: int | None = None):
    """Yield (epoch, index, examples) from position (epoch, index) on, epoch after epoch;
    `epochs` epochs in all, or forever with None. Each epoch's order is fixed by (seed, epoch)."""
    while epochs is None or epoch < epochs:
        for i, examples in enumerate(shuffled_batches(data, batch_size, seed, epoch, start=index),
                                     start=index):
            yield epoch, i, examples
        epoch, index = epoch + 1, 0


@torch.no_grad()
def evaluate_loss(model: nn.Module, data, batch_size: int = 8, pad_token_id: int = 0,
                  max_length: int | None = None, autocast: Callable = contextlib.nullcontext,
                  rank: int = 0, world_size: int = 1) -> float:
    """Mean loss per target token over the whole of `data` (eval mode, no gradients).
    With world_size > 1 each rank takes every world_size-th batch and the sums are reduced;
    a sharded (FSDP) model runs the same number of forwards on every rank."""
    was_training = model.training
    model.eval()
    device, sharded = next(model.parameters()).device, is_sharded(model)
    acc = torch.zeros(2, dtype=torch.float64, device=device)   # (summed loss, targets)
    n_batches = math.ceil(len(data) / batch_size)
    try:
        # batches rank, rank + world, ...; under FSDP as many rounds for every rank
        for b in range(rank, math.ceil(n_batches / world_size) * world_size, world_size):
            examples, batch, n = list(data[b * batch_size:(b + 1) * batch_size]), None, 0
            if examples:
                batch = to_device(collate(examples, pad_token_id, max_length), device)
                n = count_targets(batch)
            if n:
                with autocast():
                    acc[0] += model(**batch, return_logits=False).loss.double() * n
                acc[1] += n
            elif sharded:  # nothing to score, but FSDP's all-gathers must pair up
                idle_pass(model, device, autocast, backward=False)
    finally:
        model.train(was_training)
    if world_size > 1:
        dist.all_reduce(acc)
    return (acc[0] / acc[1]).item() if acc[1] > 0 else float("nan")


def to_device(batch: dict, device) -> dict:
    return {k: v.to(device, non_blocking=True) for k, v in batch.items()}


def microbatch_seed(seed: int, step: int, j: int) -> int:
    return ((seed * 1_000_003 + step) * 65_537 + j) % 2**63


# ----------------------------------------------------------------------------- processes
def launched_world_size() -> int:
    """WORLD_SIZE as torchrun sets it (1 when started as a plain process)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def cpu_has_native_bf16() -> bool:
    """True on CPUs with bf16 matmul instructions (AVX512-BF16 or AMX), where bf16 autocast
    runs in hardware; elsewhere bf16 on the CPU is emulated, which is slower than fp32."""
    return bool(torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported())


def native_bf16(device: torch.device) -> bool:
    """Whether bf16 autocast runs in hardware on `device`: a CUDA GPU that supports it, or a
    CPU with native bf16 (cpu_has_native_bf16)."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    return device.type == "cpu" and cpu_has_native_bf16()


def choose_device(name: str | None, bf16: bool | None) -> tuple[torch.device, bool]:
    """(device, use bf16 autocast). name None: CUDA if available, cuda:LOCAL_RANK under
    torchrun; bf16 None: on for CUDA devices that support it and for CPUs with native bf16
    (weights, gradients and AdamW state stay fp32 either way: autocast only changes the
    dtype matmuls run in)."""
    device = torch.device(name or default_device())
    if device.type == "cuda" and device.index is None and launched_world_size() > 1:
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    if device.type == "cuda":
        torch.cuda.set_device(device)
    native = native_bf16(device)
    if bf16 and not native:
        raise ValueError(f"TrainConfig.bf16=True needs a CUDA GPU or a CPU with native bf16 "
                         f"(AVX512-BF16 or AMX); {device} has neither")
    return device, native if bf16 is None else bf16


def init_process_group(device: torch.device) -> None:
    """Join the process group torchrun describes (WORLD_SIZE > 1), unless one exists (the
    caller may create it). The group is left in place for later train() calls and the
    caller's own collectives: a destroyed group cannot reliably be created again in the
    same job (stale rendezvous keys; gloo then fails to connect, or hangs)."""
    if launched_world_size() > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")


def rank_world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    """Sum `t` over all processes in place (nothing to do in one process); returns t."""
    if rank_world()[1] > 1:
        dist.all_reduce(t)
    return t


def barrier() -> None:
    if rank_world()[1] > 1:
        dist.barrier()


def broadcast_parameters(params: list[torch.Tensor]) -> None:
    """Give every process rank 0's values (e.g. of a randomly initialised LoRA). Shards,
    of a model an earlier train() sharded, differ by design and are left alone."""
    if rank_world()[1] > 1:
        for p in params:
            if not _is_dtensor(p):
                dist.broadcast(p.data, 0)


def reduce_gradients(params: list[nn.Parameter]) -> None:
    """Sum the gradients of `params` over all processes with one all_reduce of a flat
    buffer. A parameter gets a gradient if any process has one, so AdamW skips it
    exactly as it would in one process."""
    like = params[0]
    flat = torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1)
                      for p in params]
                     + [torch.tensor([float(p.grad is not None) for p in params],
                                     dtype=like.dtype, device=like.device)])
    dist.all_reduce(flat)
    offset, has_grad = 0, flat[-len(params):]
    for k, p in enumerate(params):
        g = flat[offset:offset + p.numel()].view_as(p)
        offset += p.numel()
        p.grad = g.clone() if has_grad[k] > 0 else None


# ----------------------------------------------------------------------------- FSDP
def shard_model(model: nn.Module, device: torch.device) -> None:
    """fully_shard every transformer block, then the whole model (in place, lasting), over
    all processes of the default group; gradients are summed, not averaged."""
    try:
        from torch.distributed.fsdp import fully_shard
    except ImportError:
        raise ValueError("TrainConfig.fsdp=True needs torch >= 2.6 (torch.distributed.fsdp."
                         f"fully_shard); this is torch {torch.__version__}") from None
    if is_sharded(model):   # by an earlier train()
        return
    from torch.distributed.device_mesh import init_device_mesh

    from .model import Block
    mesh = init_device_mesh(device.type, (rank_world()[1],))
    blocks = [m for m in model.modules() if isinstance(m, Block)]
    if not blocks:
        raise ValueError(f"fsdp: no transformer Block found in {type(model).__name__}")
    for p in model.parameters():  # fully_shard refuses views, e.g. the loader's transposed
        if not p.is_contiguous():  # Conv1D weights; copying here keeps plain loading copy-free
            p.data = p.data.contiguous()
    for block in blocks:
        fully_shard(block, mesh=mesh)
    fully_shard(model, mesh=mesh)  # the rest: embeddings (tied lm_head), ln_f, adapters outside
    for m in model.modules():
        if _is_fsdp_module(m):
            m.set_gradient_divide_factor(1.0)          # sum over processes, as all_reduce does
            m.set_force_sum_reduction_for_comms(True)  # (a plain SUM: gloo has no PREMUL_SUM)


def is_sharded(model: nn.Module) -> bool:
    return any(_is_fsdp_module(m) for m in model.modules())


def reshard(model: nn.Module) -> None:
    """Free the full weights FSDP keeps after a forward without backward (it leaves the
    root's unsharded, e.g. after an evaluation), so the module's parameters are the shards
    again and the next forward gathers their current values."""
    for m in model.modules():
        if _is_fsdp_module(m):
            m.reshard()


def local(t: torch.Tensor) -> torch.Tensor:
    """This process's part of a sharded tensor (a view: writing to it writes the shard);
    an unsharded tensor itself."""
    return t.to_local() if _is_dtensor(t) else t


def shard_like(full: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """`full` (the same on every process) sharded as `like` is; unchanged if `like` is not
    sharded. No communication: each process keeps its own rows."""
    if not _is_dtensor(like):
        return full
    from torch.distributed.tensor import distribute_tensor
    return distribute_tensor(full.to(like.device), like.device_mesh, like.placements,
                             src_data_rank=None)


def gather_to_rank0(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Full, contiguous CPU copies of `tensors` on rank 0, {} on the other ranks. Sharded
    tensors are all-gathered one at a time, so every process must call this, with the
    same names in the same order."""
    rank, out = rank_world()[0], {}
    for name, t in tensors.items():
        if _is_dtensor(t):
            t = t.full_tensor()
        if rank == 0:
            out[name] = t.detach().to("cpu").contiguous()
    return out


def gather_optimizer_state(optimizer: torch.optim.Optimizer) -> dict:
    """optimizer.state_dict() with full CPU tensors: rank 0's result is the one to save
    (a collective under FSDP, like gather_to_rank0)."""
    sd = optimizer.state_dict()
    state = {i: {**s, **gather_to_rank0({k: v for k, v in s.items()
                                         if isinstance(v, torch.Tensor)})}
             for i, s in sd["state"].items()}
    return {"state": state, "param_groups": sd["param_groups"]}


def shard_optimizer_state(saved: dict, optimizer: torch.optim.Optimizer) -> dict:
    """The inverse, for loading: each moment of a sharded parameter sharded like it."""
    params = [p for g in optimizer.param_groups for p in g["params"]]   # state_dict's numbering

    def shard(i, v):
        p = params[i] if isinstance(i, int) and i < len(params) else None
        fits = p is not None and isinstance(v, torch.Tensor) and v.shape == p.shape
        return shard_like(v, p) if fits else v   # a mismatch is left to load_state_dict
    return {**saved, "state": {i: {k: shard(i, v) for k, v in s.items()}
                               for i, s in saved["state"].items()}}


def grad_norm(grads: list[torch.Tensor]) -> float:
    """The global L2 norm of `grads`; for shards, the squares summed over processes."""
    if not grads:
        return 0.0
    if _is_dtensor(grads[0]):
        norms = torch._foreach_norm([g.to_local() for g in grads])
        return math.sqrt(all_reduce_sum(torch.stack(norms).double().square().sum()).item())
    return torch.linalg.vector_norm(torch.stack(torch._foreach_norm(grads))).item()


def idle_pass(model: nn.Module, device, autocast=contextlib.nullcontext,
              backward: bool = True) -> None:
    """A forward (and backward) that changes no gradient: a 2-token batch whose loss is
    multiplied by 0. Under FSDP a process with nothing (left) to do runs it, so that its
    all-gathers and reduce-scatters pair up with those of the other processes."""
    ids = torch.zeros(1, 2, dtype=torch.long, device=device)
    with autocast():
        loss = model(input_ids=ids, labels=ids, return_logits=False).loss
    if backward:
        (loss * 0.0).backward()
