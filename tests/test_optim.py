"""GroupedAdam: torch's Adam arithmetic over all groups at once, each group at its own learning rate."""
import copy

import pytest
import torch

from vitqc.optim import GroupedAdam


def _params(seed: int = 0) -> list[torch.nn.Parameter]:
    g = torch.Generator().manual_seed(seed)
    shapes = [(3,), (4, 5), (), (2, 3, 4), (7,)]
    return [torch.nn.Parameter(torch.randn(s, generator=g)) for s in shapes]


def _run(make, steps: int = 6, skip: int | None = 1) -> tuple[list[torch.Tensor], torch.optim.Optimizer]:
    """Several steps with one group per tensor (learning rates spread over 1e-3..1e-1), a cosine schedule,
    and the tensor ``skip`` left without a gradient on odd steps (as block-wise staging does)."""
    params = _params()
    opt = make([{"params": [p], "lr": 10.0 ** (-1 - i % 3)} for i, p in enumerate(params)])
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5 * (1 + torch.cos(torch.tensor(s / steps * 3.14159)).item()))
    g = torch.Generator().manual_seed(1)
    for step in range(steps):
        opt.zero_grad(set_to_none=True)
        loss = sum((p * torch.randn(p.shape, generator=g)).sum() + (p**2).sum() for p in params)
        loss.backward()
        if skip is not None and step % 2:
            params[skip].grad = None
        opt.step()
        sched.step()
    return [p.detach().clone() for p in params], opt


@pytest.mark.parametrize("foreach", [True, False])
def test_grouped_adam_matches_torch_adam_group_by_group(foreach):
    ours, opt = _run(lambda groups: GroupedAdam(groups))
    theirs, ref = _run(lambda groups: torch.optim.Adam(groups, foreach=foreach))
    for a, b in zip(ours, theirs):
        assert torch.equal(a, b)
    # the same state, in the same state_dict layout (so checkpoints load into either)
    for (pa, sa), (pb, sb) in zip(opt.state.items(), ref.state.items()):
        assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)
    assert float(opt.state[opt.param_groups[1]["params"][0]]["step"]) == 3  # the skipped tensor counts its own steps


def test_grouped_adam_resumes_from_a_torch_adam_state_dict():
    params = _params()
    ref = torch.optim.Adam([{"params": [p], "lr": 0.01 * (i + 1)} for i, p in enumerate(params)])
    for p in params:
        p.grad = torch.ones_like(p)
    ref.step()
    ours = GroupedAdam([{"params": [p], "lr": 0.01 * (i + 1)} for i, p in enumerate(params)])
    ours.load_state_dict(copy.deepcopy(ref.state_dict()))  # its own copy: ref steps again below
    before = [p.detach().clone() for p in params]
    ours.step()
    ref_params = [p.detach().clone() for p in params]
    with torch.no_grad():
        for p, b in zip(params, before):
            p.copy_(b)
    ref.step()
    for a, p in zip(ref_params, params):
        assert torch.allclose(a, p, rtol=0, atol=1e-7)


def test_grouped_adam_refuses_what_it_does_not_implement():
    with pytest.raises(ValueError, match="plain Adam only"):
        GroupedAdam([{"params": _params()[:1], "weight_decay": 0.1}])
