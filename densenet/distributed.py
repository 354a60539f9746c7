"""Several processes and machines: torchrun + DistributedDataParallel.

``torchrun --nproc_per_node N -m densenet train ...`` sets RANK / WORLD_SIZE / LOCAL_RANK
(``densenet train --nproc N`` launches exactly that on one machine); :func:`init_from_env`
joins that process group. Backend: nccl on CUDA, gloo
on CPU. PyTorch's own ``nn.SyncBatchNorm`` refuses CPU tensors, so this module has a
synchronised BatchNorm that works on both (needed for the CPU tests, and for CPU clusters).
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn as nn



@dataclass(frozen=True)
class World:
    rank: int = 0
    size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init_from_env(device_name: str) -> World:
    """Join the process group torchrun describes in the environment (a 1-process World otherwise)."""
    size = int(os.environ.get("WORLD_SIZE", "1"))
    if size <= 1:
        return World()
    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    use_cuda = device_name != "cpu" and torch.cuda.is_available()
    if use_cuda:
        torch.cuda.set_device(local_rank)
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if use_cuda else "gloo")
    return World(rank, size, local_rank)


def all_reduce_sum(values: list[float], device: torch.device) -> list[float]:
    """Sum numbers over all processes (identity when not distributed)."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return values
    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return t.tolist()


def gather_objects(obj) -> list:
    """Every process's ``obj``, in rank order (``[obj]`` when not distributed)."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return [obj]
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def shutdown() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


# ----------------------------------------------------------------------------- SyncBatchNorm

class _SyncBatchNormFunction(torch.autograd.Function):
    """Batch statistics over every process's batch; the backward reduces the two sums it needs."""

    @staticmethod
    def forward(ctx, x, weight, bias, eps):
        dims = [0, 2, 3]
        local = torch.cat([x.sum(dims), (x * x).sum(dims),
                           torch.tensor([x.numel() / x.shape[1]], dtype=x.dtype, device=x.device)])
        dist.all_reduce(local)
        c = x.shape[1]
        count = local[-1]
        mean = local[:c] / count
        var = local[c:2 * c] / count - mean * mean
        invstd = torch.rsqrt(var.clamp_min(0) + eps)
        xhat = (x - mean[None, :, None, None]) * invstd[None, :, None, None]
        ctx.save_for_backward(xhat, weight, invstd, count)
        unbiased = var * count / (count - 1).clamp_min(1)
        ctx.mark_non_differentiable(mean, unbiased)
        out = xhat * weight[None, :, None, None] + bias[None, :, None, None]
        return out, mean, unbiased

    @staticmethod
    def backward(ctx, grad_out, _gm, _gv):
        xhat, weight, invstd, count = ctx.saved_tensors
        dims = [0, 2, 3]
        sums = torch.cat([grad_out.sum(dims), (grad_out * xhat).sum(dims)])
        grad_bias_local, grad_weight_local = sums.chunk(2)
        grad_bias_local, grad_weight_local = grad_bias_local.clone(), grad_weight_local.clone()
        dist.all_reduce(sums)
        sum_dy, sum_dy_xhat = sums.chunk(2)
        g = (grad_out - (sum_dy / count)[None, :, None, None]
             - xhat * (sum_dy_xhat / count)[None, :, None, None])
        grad_x = g * (weight * invstd)[None, :, None, None]
        # parameter gradients stay local: DDP averages them over processes like any other
        return grad_x, grad_weight_local, grad_bias_local, None


class SyncBatchNorm2d(nn.BatchNorm2d):
    """BatchNorm2d whose training statistics cover the global batch, on CPU (gloo) and CUDA."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not (self.training and dist.is_available() and dist.is_initialized()
                and dist.get_world_size() > 1):
            return super().forward(x)
        out, mean, unbiased_var = _SyncBatchNormFunction.apply(x.float() if x.dtype == torch.bfloat16 else x,
                                                               self.weight, self.bias, self.eps)
        with torch.no_grad():
            self.num_batches_tracked.add_(1)
            m = self.momentum
            self.running_mean.mul_(1 - m).add_(mean.detach(), alpha=m)
            self.running_var.mul_(1 - m).add_(unbiased_var.detach(), alpha=m)
        return out.to(x.dtype)


def convert_sync_batchnorm(module: nn.Module) -> nn.Module:
    """Replace every BatchNorm2d by :class:`SyncBatchNorm2d`, keeping parameters and buffers."""
    for name, child in module.named_children():
        if type(child) is nn.BatchNorm2d:
            sync = SyncBatchNorm2d(child.num_features, child.eps, child.momentum, child.affine,
                                   child.track_running_stats, device=child.weight.device,
                                   dtype=child.weight.dtype)
            sync.load_state_dict(child.state_dict())
            setattr(module, name, sync)
        else:
            convert_sync_batchnorm(child)
    return module
