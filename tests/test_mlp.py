"""MLPVelocity: the network calling convention, CFG label dropout, input errors, and that it learns."""

import pytest
import torch

from flowmatch.networks.mlp import MLPVelocity


def test_output_shape_and_zero_at_init():
    net = MLPVelocity(dim=3, hidden=32, depth=3, time_dim=16)
    z, t = torch.randn(5, 3), torch.rand(5)
    v = net(z, t)
    assert v.shape == z.shape
    assert torch.equal(v, torch.zeros_like(z))  # zero-initialised output layer
    assert net(z, torch.tensor(0.5)).shape == z.shape  # a scalar t is broadcast to the batch
    # Conditional: labels, null labels and None are all accepted.
    cnet = MLPVelocity(hidden=32, depth=2, time_dim=16, num_classes=4)
    labels = torch.tensor([0, 3, 4, 1])
    assert cnet(torch.randn(4, 2), torch.rand(4), labels).shape == (4, 2)
    assert cnet(torch.randn(4, 2), torch.rand(4)).shape == (4, 2)


def test_null_condition():
    net = MLPVelocity(num_classes=10, hidden=16, depth=1, time_dim=8)
    cond = torch.tensor([0, 5, 9])
    null = net.null_condition(cond)
    assert torch.equal(null, torch.full((3,), 10)) and null.dtype == cond.dtype
    assert net.null_condition(None) is None
    assert MLPVelocity(hidden=16, depth=1, time_dim=8).null_condition(cond) is None
    # None means "unconditional": the same prediction as explicit null labels (in eval mode).
    net.eval()
    with torch.no_grad():
        torch.nn.init.normal_(net.out.weight)  # make the output depend on the input
        z, t = torch.randn(3, 2), torch.rand(3)
        assert torch.allclose(net(z, t, None), net(z, t, null))
        assert not torch.allclose(net(z, t, cond), net(z, t, null))


def test_label_dropout_only_in_training_at_the_configured_rate():
    net = MLPVelocity(num_classes=5, cond_drop_prob=0.25, hidden=16, depth=1, time_dim=8)
    # Watch the labels that actually reach the class-embedding table during forward.
    seen = []
    net.class_embed.register_forward_hook(lambda module, inputs, output: seen.append(inputs[0].clone()))
    n = 20_000
    labels = torch.randint(0, 5, (n,))
    z, t = torch.randn(n, 2), torch.rand(n)
    torch.manual_seed(0)

    net.train()
    net(z, t, labels)
    used = seen[-1]
    dropped = used == net.null_class
    assert abs(dropped.float().mean().item() - 0.25) < 0.015
    assert torch.equal(used[~dropped], labels[~dropped])  # the others pass through unchanged

    net.eval()
    net(z, t, labels)
    assert torch.equal(seen[-1], labels)  # no dropout at evaluation

    net.train()
    net.cond_drop_prob = 0.0
    net(z, t, labels)
    assert torch.equal(seen[-1], labels)  # no dropout when the probability is 0


def test_bad_inputs_raise_clear_errors():
    net = MLPVelocity(num_classes=3, hidden=16, depth=1, time_dim=8)
    t = torch.rand(4)
    with pytest.raises(ValueError, match=r"expected z of shape \(batch, 2\), got \(4, 3\)"):
        net(torch.randn(4, 3), t)
    with pytest.raises(ValueError, match=r"t of shape \(4,\).*got \(3,\)"):
        net(torch.randn(4, 2), torch.rand(3))
    with pytest.raises(ValueError, match=r"labels in \[0, 3\) or 3 .*got values in \[0, 7\]"):
        net(torch.randn(4, 2), t, torch.tensor([0, 1, 2, 7]))
    with pytest.raises(ValueError, match=r"got values in \[-1, 1\]"):
        net(torch.randn(4, 2), t, torch.tensor([0, 1, -1, 1]))
    with pytest.raises(ValueError, match="integer class labels"):
        net(torch.randn(4, 2), t, torch.zeros(4))
    with pytest.raises(ValueError, match="unconditional"):
        MLPVelocity(hidden=16, depth=1, time_dim=8)(torch.randn(4, 2), t, torch.zeros(4, dtype=torch.long))
    with pytest.raises(ValueError, match="cond_drop_prob"):
        MLPVelocity(num_classes=3, cond_drop_prob=1.5)


@pytest.fixture
def one_thread():
    """Tiny matmuls gain nothing from threads, and on a busy 2-core machine threads can stall."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def test_tiny_mlp_fits_a_time_and_class_dependent_field(one_thread):
    torch.manual_seed(0)
    net = MLPVelocity(hidden=64, depth=2, time_dim=16, num_classes=2, cond_drop_prob=0.0)
    opt = torch.optim.Adam(net.parameters(), lr=3e-3)

    def target(z, t, c):
        sign = 2.0 * c.float()[:, None] - 1.0  # the class flips the field
        return sign * torch.stack([-z[:, 1], z[:, 0]], dim=1) * (1 + t[:, None]) + t[:, None]

    losses = []
    for _ in range(300):
        z, t, c = torch.randn(256, 2), torch.rand(256), torch.randint(0, 2, (256,))
        loss = (net(z, t, c) - target(z, t, c)).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    start, end = sum(losses[:10]) / 10, sum(losses[-10:]) / 10
    assert end < 0.01 * start, (start, end)  # typically ~1e-3 of the start
