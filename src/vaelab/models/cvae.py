"""The conditional VAE (Sohn et al. 2015): a VAE whose encoder and decoder also see a condition c,
q(z|x, c) and p(x|z, c), with the prior N(0, I). Labels become one-hot vectors; any float vector works too.
The condition enters as extra input channels (images, spatial latents) or features (vectors)."""

import torch
import torch.nn.functional as F

from vaelab.errors import VaelabError
from vaelab.models.base import Capabilities
from vaelab.models.registry import register
from vaelab.models.vae import VAE


@register("cvae", description="Conditional VAE: encoder and decoder conditioned on a label (one-hot) or a vector.")
class CVAE(VAE):
    capabilities = Capabilities(stochastic=True, samples=True, conditional=True)

    def condition_vector(self, condition) -> torch.Tensor:
        """(B,) integer labels -> one-hot (B, condition_dim); (B, condition_dim) floats pass through."""
        k = self.config.condition_dim
        if condition is None:
            raise VaelabError(f"model 'cvae' needs a condition: class labels in [0, {k}) or vectors of "
                              f"{k} values (e.g. `vaelab sample RUN --label 3`)")
        condition = torch.as_tensor(condition)
        if not condition.is_floating_point():
            if condition.dim() != 1 or (len(condition) and (condition.min() < 0 or condition.max() >= k)):
                raise VaelabError(f"labels must be a 1-D tensor of class indices in [0, {k}); got shape "
                                  f"{tuple(condition.shape)} with values {condition.unique()[:10].tolist()}")
            return F.one_hot(condition.long(), k).to(torch.get_default_dtype())
        if condition.dim() != 2 or condition.shape[1] != k:
            raise VaelabError(f"a condition vector must have shape (B, {k}); got {tuple(condition.shape)}")
        return condition

    def _with_condition(self, t: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        c = c.to(t.dtype)
        if t.dim() == 4:  # (B, C, H, W): the condition as constant channels
            return torch.cat([t, c[:, :, None, None].expand(-1, -1, *t.shape[2:])], dim=1)
        return torch.cat([t.flatten(1), c], dim=1)  # (B, D + condition_dim)

    def encode(self, x, condition=None):
        return super().encode(self._with_condition(x, self.condition_vector(condition)))

    def decode_raw(self, z, condition=None):
        return self.decoder(self._with_condition(z, self.condition_vector(condition)))
