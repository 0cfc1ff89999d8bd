"""V-like samples with a known structure: low rank (PCA's case) and the same
bent by monotone maps (the case a spline can undo and PCA cannot)."""

import torch


def synthetic_v(n, dim=64, seed=0, rank=12):
    """Low-rank V-like samples (n, dim): rank strong directions + weak tail + noise."""
    g = torch.Generator().manual_seed(seed)
    strong = torch.randn(n, rank, generator=g) @ torch.randn(rank, dim, generator=g)
    scales = torch.logspace(0, -1.5, dim)  # the weak, decaying tail
    tail = (torch.randn(n, dim, generator=g) * scales) @ torch.linalg.qr(torch.randn(dim, dim, generator=g))[0]
    x = strong / rank ** 0.5 + 0.5 * tail + 0.05 * torch.randn(n, dim, generator=g)
    return x / x.std(0)


def warped_v(n, dim=64, seed=0, rank=12):
    """synthetic_v with every dimension bent by a known monotone map."""
    z = synthetic_v(n, dim, seed, rank)
    x = z.clone()
    x[:, 0::3] = torch.sinh(1.5 * z[:, 0::3])
    x[:, 1::3] = z[:, 1::3].sign() * z[:, 1::3].abs() ** 1.5
    x[:, 2::3] = torch.exp(z[:, 2::3])
    return x
