"""Input corruption for denoising autoencoders (Vincent et al. 2008): the model sees corrupt(x) and is
trained to reconstruct the clean x. Any model can be trained this way; it is a training option.
"""

from __future__ import annotations

import torch

from vaelab.config import NOISES


def corrupt(x: torch.Tensor, kind: str, level: float, generator: torch.Generator | None = None) -> torch.Tensor:
    """A corrupted copy of x (B, ...):
    - "gaussian":    x + level·ε, ε ~ N(0, 1) (not clipped: the encoder sees the true noisy values);
    - "masking":     each entry set to 0 with probability `level` (dropout noise, not rescaled);
    - "salt-pepper": each entry, with probability `level`, set to 0 or 1 with equal chance.
    """
    if kind == "none" or level == 0:
        return x
    if kind == "gaussian":
        return x + level * torch.randn(x.shape, generator=generator, dtype=x.dtype, device=x.device)
    u = torch.rand(x.shape, generator=generator, dtype=x.dtype, device=x.device)
    if kind == "masking":
        return x.masked_fill(u < level, 0.0)
    if kind == "salt-pepper":
        hit = u < level
        salt = u < level / 2  # half of the hits become 1, half 0
        return torch.where(hit, salt.to(x.dtype), x)
    raise ValueError(f"unknown noise {kind!r}; choose one of {list(NOISES)}")
