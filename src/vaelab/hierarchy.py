"""Stochastic layers above the first: a latent hierarchy (Burda et al., 2015, Section 5).

With ``L`` layers the model is ``p(z_L) p(z_{L-1}|z_L) ... p(z_1|z_2) p(x|z_1)`` and the posterior
``q(z_1|x) q(z_2|z_1) ... q(z_L|z_{L-1})``: the encoder and decoder are the first layer's, and each
:class:`StochasticLayer` adds one more, with an inference network ``q(z_{l+1}|z_l)`` (``up``) and
a generative one ``p(z_l|z_{l+1})`` (``down``), both diagonal Gaussians whose mean and log-variance
come from an MLP. The prior scores the top layer ``z_L``.
"""

from collections.abc import Sequence

from torch import Tensor, nn
from torch.func import functional_call

from vaelab.config import ConfigError
from vaelab.nets.mlp import mlp
from vaelab.posteriors.gaussian import DiagonalGaussian


class GaussianLayer(nn.Module):
    """``z_in [..., in_dim] -> N(mean, diag exp(log_var))`` over ``[..., out_dim]``, both heads from
    one MLP ``in_dim -> hidden_dims -> 2 out_dim``."""

    def __init__(self, in_dim: int, out_dim: int, hidden_dims: Sequence[int], activation: str = "tanh") -> None:
        super().__init__()
        self.net = mlp([in_dim, *hidden_dims, 2 * out_dim], activation=activation)

    def forward(self, z: Tensor) -> DiagonalGaussian:
        mean, log_var = self.net(z).to(z.dtype).chunk(2, dim=-1)
        return DiagonalGaussian(mean, log_var)

    def detached(self, z: Tensor) -> DiagonalGaussian:
        """The same conditional with the weights cut from the graph and ``z`` not: DReG scores
        ``log q(z_{l+1}|z_l)`` as a function of the samples only."""
        weights = {name: p.detach() for name, p in self.named_parameters()}
        return functional_call(self, weights, (z,))


class StochasticLayer(nn.Module):
    """One layer of ``latent_dim`` latents above a layer of ``below_dim``.

    Args:
        below_dim: size of the layer below (the first layer's: the encoder's ``latent_dim``).
        latent_dim: size of this layer.
        hidden_dims: hidden widths of ``q(z_{l+1}|z_l)``'s MLP; ``p(z_l|z_{l+1})`` uses them reversed.
        activation: ``tanh`` (the IWAE paper's) or ``elu``.
    """

    def __init__(self, below_dim: int, latent_dim: int, hidden_dims: Sequence[int] = (100, 100),
                 activation: str = "tanh") -> None:
        super().__init__()
        widths = {"below_dim": below_dim, "latent_dim": latent_dim}
        for name, width in [*widths.items(), *(("hidden_dims", h) for h in hidden_dims)]:
            if not (isinstance(width, int) and width >= 1):
                raise ConfigError(f"model.layers: each {name} must be a positive integer (a layer needs width), "
                                  f"got {width}")
        self.below_dim, self.latent_dim = below_dim, latent_dim
        self.up = GaussianLayer(below_dim, latent_dim, hidden_dims, activation)
        self.down = GaussianLayer(latent_dim, below_dim, list(reversed(hidden_dims)), activation)


def check_stack(first_dim: int, layers: Sequence[StochasticLayer], latent_dim: int) -> None:
    """Each layer sits on the one below it, and the top one is ``latent_dim`` wide."""
    below = first_dim
    for i, layer in enumerate(layers):
        if layer.below_dim != below:
            raise ConfigError(f"model.layers[{i}].below_dim must be {below} (the width of the layer below), "
                              f"got {layer.below_dim}")
        below = layer.latent_dim
    if below != latent_dim:
        raise ConfigError(f"the top latent layer is {below} wide but model.latent_dim is {latent_dim}: make them equal")


def mean_path(z: Tensor, conditionals: Sequence[GaussianLayer]) -> Tensor:
    """``z`` pushed through each conditional's mean in turn: the deterministic path the pictures
    decode along, and VampPrior's top-layer Gaussian at a pseudo-input."""
    for conditional in conditionals:
        z = conditional(z).mean
    return z
