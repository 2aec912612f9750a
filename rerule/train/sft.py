"""The supervised (SFT) loop shared by the demo world's pre-training (``rerule.demo.world.pretrain``)
and RULE's warm start (``rerule.train.warm_start``).

Each step: loss of the batch, zero the gradients, backward, clip the gradient norm, optimizer step,
scheduler step. The callers choose the batches, the loss, the optimizer and the schedule.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch


def sft_steps(
    params: list[torch.nn.Parameter],
    opt: torch.optim.Optimizer,
    sched,
    batches: Iterable,
    loss_fn: Callable[[object], torch.Tensor],
    *,
    max_grad_norm: float = 1.0,
) -> list[float]:
    """One optimizer step per batch of ``batches`` on ``loss_fn(batch)``, a scalar tensor.

    Args:
        params: the trained parameters (their gradient norm is clipped to ``max_grad_norm``).
        opt: the optimizer over ``params``.
        sched: its learning-rate scheduler, stepped after each optimizer step.
        batches: consumed lazily, one step each (a generator may draw its order as it goes).
        loss_fn: the batch's loss, with a graph to ``params``.

    Returns:
        The loss of each step, as floats.
    """
    if max_grad_norm <= 0:
        raise ValueError(f"max_grad_norm must be > 0, got {max_grad_norm}")
    losses = []
    for batch in batches:
        loss = loss_fn(batch)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, max_grad_norm)
        opt.step()
        sched.step()
        losses.append(float(loss.detach()))
    return losses
