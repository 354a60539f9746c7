"""Training steps behind one interface, and the whole step as one CUDA graph.

A step is called with a batch ``(x, y)`` on the training device, does forward, loss, backward
and the optimizer update, and returns the loss and the number of wrong predictions as device
tensors (:class:`Step`). It reads nothing back to the host, so the training loop decides when
to wait for the device. :class:`EagerStep` is the ordinary step (also compiled or under DDP);
:class:`GraphedStep` is the same step captured as one CUDA graph (``--cuda-graph``).

A DenseNet-BC step on small images launches a few thousand kernels, each too short to hide the
launch cost, so on a fast GPU the step is bound by the host, not by the GPU's arithmetic.
Capturing the step once and replaying it launches all of them in one call. That needs a step
with no host synchronisation (no ``.item()``, no pageable copy), static tensors (the batch is
copied into fixed input tensors; parameters, gradients and optimizer state keep their
addresses) and a learning rate that the graph reads from a tensor, so the schedule changes it
without a new capture.

``torch.optim.SGD`` reads a tensor learning rate with ``.item()`` outside ``torch.compile``, so
the captured update is :func:`sgd_update`: the same arithmetic as its foreach path (weight
decay, momentum, Nesterov), on its own momentum buffers, with the rate a 0-d tensor; a
checkpoint's optimizer state is therefore the ordinary ``torch.optim.SGD`` state.
"""

from __future__ import annotations

from typing import Protocol

import torch

from .devices import autocast
from .errors import UsageError
from .objectives import CrossEntropy


class Step(Protocol):
    """One training step: ``step(x, y) -> (loss, wrong)``, both 0-d tensors on the device (the
    batch's mean loss and its number of wrong top-1 predictions); ``set_lr()`` after the
    optimizer's group rates changed."""

    def __call__(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]: ...

    def set_lr(self) -> None: ...


class EagerStep:
    """The ordinary step: forward (under bf16 autocast if asked), the loss (``objective``,
    default cross-entropy with ``label_smoothing``), backward, the optimizer's update. Full
    batches go through ``model`` (compiled, or wrapped in DDP); a batch
    of another size (the epoch's smaller last one) through ``eager_model``, the same module
    uncompiled, so ``torch.compile`` never compiles it again for that shape."""

    def __init__(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                 device: torch.device, batch_size: int, amp: str | None = None,
                 label_smoothing: float = 0.0, eager_model: torch.nn.Module | None = None,
                 objective=None):
        self.model, self.optimizer, self.device, self.amp = model, optimizer, device, amp
        self.eager_model = model if eager_model is None else eager_model
        self.batch_size = batch_size
        self.objective = CrossEntropy(label_smoothing) if objective is None else objective

    def set_lr(self) -> None:
        """Nothing to do: the optimizer reads its groups' rates at every step."""

    def __call__(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        model = self.model if x.shape[0] == self.batch_size else self.eager_model
        with autocast(self.device, self.amp):
            loss, wrong = self.objective(model(x), y)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        return loss.detach(), wrong


@torch.no_grad()
def sgd_update(optimizer: torch.optim.SGD, lrs: list[torch.Tensor]) -> None:
    """One ``torch.optim.SGD`` step of every parameter with a gradient, with group i's learning
    rate the 0-d tensor ``lrs[i]``: no host synchronisation, so a CUDA graph can replay it.
    Every such parameter needs its momentum buffer already (after one ``optimizer.step()``);
    ``maximize`` and ``foreach=False`` are not supported."""
    if len(lrs) != len(optimizer.param_groups):
        raise ValueError(f"sgd_update: {len(lrs)} learning rates for "
                         f"{len(optimizer.param_groups)} parameter groups.")
    for group, lr in zip(optimizer.param_groups, lrs):
        if group.get("maximize"):
            raise ValueError("sgd_update does not support maximize=True.")
        params = [p for p in group["params"] if p.grad is not None]
        if not params:
            continue
        grads = [p.grad for p in params]
        wd, momentum, dampening = group["weight_decay"], group["momentum"], group["dampening"]
        if wd != 0:
            grads = torch._foreach_add(grads, params, alpha=wd)
        if momentum != 0:
            try:
                bufs = [optimizer.state[p]["momentum_buffer"] for p in params]
            except KeyError:
                raise ValueError("sgd_update needs the momentum buffers of one ordinary "
                                 "optimizer.step() first.") from None
            torch._foreach_mul_(bufs, momentum)
            torch._foreach_add_(bufs, grads, alpha=1 - dampening)
            grads = torch._foreach_add(grads, bufs, alpha=momentum) if group["nesterov"] else bufs
        torch._foreach_add_(params, torch._foreach_mul(grads, torch.neg(lr)))


def check_graphable(device: torch.device, processes: int) -> None:
    """Where a captured step can run (the optimizer is checked with the config)."""
    if device.type != "cuda":
        raise UsageError(f"--cuda-graph captures the training step on a GPU; this run's device is "
                         f"{device}. Use --device cuda, or leave --cuda-graph out.")
    if processes > 1:
        raise UsageError("--cuda-graph runs in one process; leave it out with torchrun (the "
                         "gradient all-reduce of DDP is not captured).")


class GraphedStep:
    """Training steps of ``model`` with the whole step captured in one CUDA graph.

    The first ``warmup`` batches run eagerly (on a side stream on CUDA, as capture wants;
    they also create SGD's momentum buffers); the next one is captured and every later batch of
    that shape replays the graph after being copied into its static input. A batch of
    another size (the epoch's last, smaller one) runs eagerly on the same tensors, so nothing is
    captured or compiled again. Each call returns the step's loss and its number of wrong
    predictions as device tensors, without waiting for the GPU. ``set_lr()`` after changing the
    groups' ``lr`` passes the rates to the graph.

    ``capture=False`` runs the same static-tensor step without a graph (any device): the path
    that is tested where there is no GPU.
    """

    def __init__(self, model: torch.nn.Module, optimizer: torch.optim.SGD, device: torch.device,
                 batch_size: int, amp: str | None = None, label_smoothing: float = 0.0,
                 warmup: int = 3, capture: bool = True, objective=None):
        if type(optimizer) is not torch.optim.SGD:
            raise ValueError("GraphedStep steps torch.optim.SGD only.")
        if capture and device.type != "cuda":
            raise ValueError("GraphedStep(capture=True) needs a CUDA device.")
        self.model, self.optimizer, self.device, self.amp = model, optimizer, device, amp
        self.batch_size = batch_size
        self.warmup, self.capture = max(1, warmup), capture
        self.objective = CrossEntropy(label_smoothing) if objective is None else objective
        self.lrs = [torch.tensor(float(g["lr"]), dtype=torch.float32, device=device)
                    for g in optimizer.param_groups]
        self.graph = None
        self.static = None  # (x, y, loss, wrong) once the step is static
        self.eager_steps = 0
        self.replays = 0

    def set_lr(self) -> None:
        for t, g in zip(self.lrs, self.optimizer.param_groups):
            t.fill_(float(g["lr"]))

    def _forward_loss(self, x, y, cache: bool):
        with autocast(self.device, self.amp, cache):
            return self.objective(self.model(x), y)

    def _eager(self, x, y):
        """An ordinary step with torch's SGD; in place on gradients that the graph owns."""
        self.optimizer.zero_grad(set_to_none=self.static is None)
        loss, wrong = self._forward_loss(x, y, cache=True)
        loss.backward()
        self.optimizer.step()
        self.eager_steps += 1
        return loss.detach(), wrong

    def _static_step(self):
        x, y = self.static[0], self.static[1]
        loss, wrong = self._forward_loss(x, y, cache=False)
        loss.backward()
        sgd_update(self.optimizer, self.lrs)
        self.static[2].copy_(loss.detach())
        self.static[3].copy_(wrong)

    def _make_static(self, x, y) -> None:
        self.static = [x.clone(), y.clone(), torch.zeros((), device=self.device),
                       torch.zeros((), dtype=torch.long, device=self.device)]
        self.optimizer.zero_grad(set_to_none=True)  # backward in the graph assigns them
        if not self.capture:
            return
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self._static_step()

    def __call__(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.static is None:
            if x.shape[0] != self.batch_size or self.eager_steps < self.warmup:
                return self._warm(x, y)
            self._make_static(x, y)
        elif x.shape != self.static[0].shape or x.stride() != self.static[0].stride():
            return self._eager(x, y)
        self.static[0].copy_(x)
        self.static[1].copy_(y)
        if self.graph is not None:
            self.graph.replay()
        else:
            self.optimizer.zero_grad(set_to_none=True)
            self._static_step()
        self.replays += 1
        return self.static[2], self.static[3]

    def _warm(self, x, y):
        if not self.capture or self.static is not None:
            return self._eager(x, y)
        side = torch.cuda.Stream(self.device)
        side.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(side):
            out = self._eager(x, y)
        torch.cuda.current_stream(self.device).wait_stream(side)
        return out
