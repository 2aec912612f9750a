"""The shared SFT loop (rerule.train.sft.sft_steps) against a hand-written one."""

from __future__ import annotations

import pytest
import torch

from rerule.train.sft import sft_steps


def _setup():
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 1))
    params = list(net.parameters())
    opt = torch.optim.AdamW(params, lr=0.05)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / 3))
    return net, params, opt, sched


def test_sft_steps_matches_a_hand_written_loop():
    g = torch.Generator().manual_seed(1)
    data = [(torch.randn(5, 4, generator=g), torch.randn(5, 1, generator=g)) for _ in range(6)]

    net, params, opt, sched = _setup()
    want = []
    for x, y in data:
        loss = torch.nn.functional.mse_loss(net(x), y) * 50  # large enough for the clip to bite
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        want.append(float(loss.detach()))
    want_state = {k: v.clone() for k, v in net.state_dict().items()}

    net, params, opt, sched = _setup()
    got = sft_steps(params, opt, sched, iter(data), lambda b: torch.nn.functional.mse_loss(net(b[0]), b[1]) * 50)
    assert got == want
    assert all(torch.equal(v, want_state[k]) for k, v in net.state_dict().items())
    assert sched.last_epoch == len(data)
    assert all(p.grad is not None for p in params)


def test_sft_steps_clips_and_checks():
    net, params, opt, sched = _setup()
    with pytest.raises(ValueError, match="max_grad_norm"):
        sft_steps(params, opt, sched, [], lambda b: b, max_grad_norm=0.0)
    assert sft_steps(params, opt, sched, [], lambda b: b) == []
    before = [p.detach().clone() for p in params]
    x = torch.randn(3, 4)
    sft_steps(params, opt, sched, [x], lambda b: net(b).sum() * 1e6, max_grad_norm=1e-3)
    total = torch.sqrt(sum((p.grad**2).sum() for p in params))
    assert float(total) == pytest.approx(1e-3, rel=1e-4)  # the gradient left after the step is the clipped one
    assert any(not torch.equal(a, p) for a, p in zip(before, params))
