"""Helpers for tests of the networks."""

import torch


def randomize(model: torch.nn.Module, std: float = 0.2) -> torch.nn.Module:
    """Give every parameter (the zero-initialised ones included) a random value, seeded; returns the model."""
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * std)
    return model
