"""Batch normalisation over padded batches: statistics of the valid positions only, optionally over every worker's.

A CNN on a padded batch of log-mels ``(B, C, T, F)`` sees each clip's real frames and, past its end, padding. Plain
``nn.BatchNorm2d`` counts the padding in its training statistics, so a clip's output would depend on how long its
batch-mates are, and the running statistics would be biased towards the padding. ``MaskedBatchNorm2d`` counts only
the valid ``(b, t)`` positions and zeroes the padding of its output, so the next convolution sees a clip's end as
if the clip were alone.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn


class MaskedBatchNorm2d(nn.BatchNorm2d):
    """``nn.BatchNorm2d`` (the same parameters, buffers and state-dict names, so its checkpoints load) whose
    training statistics are those of the valid positions only: the mean and biased variance normalise, the
    unbiased variance goes into the running estimate, as ``nn.BatchNorm2d`` computes them on the valid positions
    alone. In eval mode it is ``nn.BatchNorm2d`` on the running statistics. The output is zero at padding.

    With ``synchronised`` set (``synchronise_batch_norms``, in data-parallel training) the training statistics are
    those of every worker's valid positions, with gradients across workers, like ``nn.SyncBatchNorm``. Never pass
    it to ``nn.SyncBatchNorm.convert_sync_batchnorm``: that would replace it with a norm that counts padding.
    """

    synchronised: bool = False  # set per module by synchronise_batch_norms

    def forward(self, x: torch.Tensor, valid: torch.Tensor | None = None) -> torch.Tensor:
        """``x`` ``(B, C, H, W)`` and ``valid``, broadcastable to ``(B, 1, H, W)`` (the encoders' ``(B, 1, T, 1)``
        time mask), 1 at real positions and 0 at padding (None: nothing is padded) -> normalised ``(B, C, H, W)``,
        0 at padding."""
        self._check_input_dim(x)
        dtype = torch.promote_types(x.dtype, torch.float32)  # statistics in float32 under autocast, as nn's
        valid = x.new_ones(1, 1, 1, 1, dtype=dtype) if valid is None else valid.to(dtype)
        if not self.training and self.running_mean is not None:  # eval: nn.BatchNorm2d on the running statistics
            y = F.batch_norm(x, self.running_mean, self.running_var, self.weight, self.bias, False, 0.0, self.eps)
            return y * valid.to(y.dtype)
        y, mean, var, count = _MaskedNorm.apply(x.to(dtype), valid, self.weight, self.bias, self.eps, self.synchronised)
        if self.training and self.running_mean is not None:
            with torch.no_grad():
                self.num_batches_tracked.add_(1)
                factor = 1.0 / float(self.num_batches_tracked) if self.momentum is None else self.momentum
                self.running_mean.lerp_(mean, factor)
                self.running_var.lerp_(var * count / (count - 1).clamp(min=1), factor)  # unbiased, as nn's
        return y.to(x.dtype)


def _total(t: torch.Tensor, synchronised: bool) -> torch.Tensor:
    """``t``, summed over every worker when ``synchronised``."""
    if synchronised:
        dist.all_reduce(t)
    return t


class _MaskedNorm(torch.autograd.Function):
    """Batch statistics of the valid positions and the normalised output, with the closed-form backward of batch
    norm: autograd through the masked sums makes several more passes over the activations (on CPU a training
    step of the demo's encoder took 1.4 times as long as with ``nn.BatchNorm2d``, this way 1.05 to 1.15).
    Synchronised, it sums the statistics, and in its backward the two sums the input gradient needs, over every
    worker, as ``nn.SyncBatchNorm`` does; the weight and bias gradients stay this worker's (data parallelism sums
    or averages them)."""

    @staticmethod
    def forward(
        ctx: torch.autograd.function.FunctionCtx,
        x: torch.Tensor,
        valid: torch.Tensor,
        weight: torch.Tensor | None,
        bias: torch.Tensor | None,
        eps: float,
        synchronised: bool,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """-> output ``(B, C, H, W)``, mean and biased variance ``(C,)``, count of valid positions ``()``."""
        count = valid.expand(x.size(0), 1, *x.shape[2:]).sum()  # valid (b, h, w) positions, the same per channel
        totals = _total(torch.cat([count[None], (x * valid).sum((0, 2, 3))]), synchronised)  # (1 + C,)
        count, mean = totals[0], totals[1:] / totals[0]
        x_hat = x - mean[:, None, None]
        # the variance about the mean, in a second pass: no cancellation, unlike E[x^2] - E[x]^2
        var = _total((x_hat.square() * valid).sum((0, 2, 3)), synchronised) / count
        inv_std = torch.rsqrt(var + eps)
        x_hat.mul_(inv_std[:, None, None])  # (B, C, H, W), normalised
        gain = torch.ones_like(inv_std) if weight is None else weight
        scale = gain[:, None, None] * valid  # (B, C, T, 1) for a time mask: 0 at padding, like the shift
        shift = (torch.zeros_like(inv_std) if bias is None else bias)[:, None, None] * valid
        ctx.save_for_backward(x_hat, valid, gain, inv_std, count)
        ctx.synchronised, ctx.affine = synchronised, weight is not None
        ctx.mark_non_differentiable(mean, var, count)
        return torch.addcmul(shift, x_hat, scale), mean, var, count

    @staticmethod
    def backward(
        ctx: torch.autograd.function.FunctionCtx, grad: torch.Tensor, *_: torch.Tensor
    ) -> tuple[torch.Tensor | None, ...]:
        x_hat, valid, gain, inv_std, count = ctx.saved_tensors
        grad = grad * valid  # (B, C, H, W): padding reaches nothing
        sums = torch.cat([grad.sum((0, 2, 3)), (grad * x_hat).sum((0, 2, 3))])  # (2C,): the bias, weight gradients
        grad_bias, grad_weight = sums.chunk(2)
        mean_grad, mean_grad_x_hat = (_total(sums.clone(), ctx.synchronised) / count)[:, None, None].chunk(2)
        # d/dx of gain * x_hat + bias, through x_hat and the mean and variance it was normalised with
        grad_x = torch.addcmul(grad - mean_grad, x_hat, -mean_grad_x_hat) * ((gain * inv_std)[:, None, None] * valid)
        affine = (grad_weight, grad_bias) if ctx.affine else (None, None)
        return grad_x, None, *affine, None, None


def synchronise_batch_norms(model: nn.Module) -> nn.Module:
    """Make every ``MaskedBatchNorm2d`` in ``model`` normalise, in training, with the statistics of all workers'
    valid positions (the equivalent of ``nn.SyncBatchNorm.convert_sync_batchnorm``). Only inside a process group
    in which every worker runs the same training forwards: each such norm all-reduces twice in its forward
    and once in its backward."""
    for module in model.modules():
        if isinstance(module, MaskedBatchNorm2d):
            module.synchronised = True
    return model
