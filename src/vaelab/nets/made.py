"""MADE (Germain et al., 2015): a masked MLP whose outputs are autoregressive in its inputs.

Every unit has a *degree*. The inputs' degrees are an ordering of ``1 .. D`` (input ``i`` has
degree ``k`` when it is the ``k``-th in the ordering). A hidden unit's degree is drawn uniformly
from ``[min degree of the previous layer, D - 1]`` (no hidden unit of degree ``D``, which could
feed no output). Masks keep a connection from a unit of degree ``a`` to one of degree ``b`` when
``a <= b`` into a hidden layer and when ``a < b`` into an output, so output ``d`` depends on input
``j`` only if ``degree(j) < degree(d)``: ``p(x) = prod_d p(x_d | x_<d)`` in one pass. The optional
direct connection is a masked input-to-output layer (mask ``<``) added to the output.

Context (the ``h`` of an IAF step, Kingma et al. 2016) is an extra input of degree 0, as in Paige
and Wood (2016) and Pyro's ``AutoRegressiveNN``: it enters as an unmasked linear term added to the
first hidden layer's pre-activation, and hidden degrees are then drawn from ``[0, D - 1]``, so
units of degree 0 carry ``h`` (only) to every output, the first included.

Connectivity-agnostic training: the module holds a fixed set of ``n_masks`` masks (their degrees
are buffers, drawn once from ``seed``); ``set_mask(i)`` / ``next_mask()`` switch between them. The
input ordering is the same for every mask when it is ``natural`` or given explicitly; with
``ordering="random"`` each mask draws its own ordering too (order-agnostic training).
"""

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from vaelab.config import ConfigError

ORDERINGS = ("natural", "random")
MAX_DRAWS = 100  # draws of one mask's hidden degrees before giving up on connecting every input


class MaskedLinear(nn.Linear):
    """``nn.Linear`` whose weight is multiplied by a 0/1 ``mask [out_features, in_features]``,
    a registered buffer (it moves with the module and is saved in its state)."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True) -> None:
        super().__init__(in_features, out_features, bias)
        self.register_buffer("mask", torch.ones(out_features, in_features))

    def set_mask(self, mask: Tensor) -> None:
        # in place, so the buffer stays a normal tensor even when set under torch.inference_mode;
        # a graph that saved the old mask for backward then fails loudly instead of using the new one
        self.mask.copy_(mask)

    def forward(self, x: Tensor) -> Tensor:
        return F.linear(x, self.weight * self.mask, self.bias)


def input_degrees(n_inputs: int, ordering: Sequence[int], generator: torch.Generator | None = None) -> Tensor:
    """Degrees ``[D]`` in ``1 .. D`` of the inputs: ``ordering`` is ``"natural"`` (input ``i`` has
    degree ``i + 1``), ``"random"`` (a permutation drawn from ``generator``) or the input indices
    in the order they are generated (``[2, 0, 1]``: input 2 first)."""
    if ordering == "natural":
        order = torch.arange(n_inputs)
    elif ordering == "random":
        order = torch.randperm(n_inputs, generator=generator)
    else:
        order = torch.as_tensor(list(ordering))
    degrees = torch.empty(n_inputs, dtype=torch.long)
    degrees[order] = torch.arange(1, n_inputs + 1)
    return degrees


class MADE(nn.Module):
    """``x [..., D]`` (and ``context [..., C]``) ``-> [..., params_per_input, D]``: output
    ``[..., p, d]`` depends only on the inputs before ``d`` in the ordering (and the context).

    Args:
        n_inputs: ``D``.
        hidden_dims: the hidden layers' widths (at least one layer, each > 0); ReLU between layers.
        params_per_input: outputs per input (1 for Bernoulli logits, 2 for an IAF's ``m, s``).
        context_dim: size of the context ``h`` (0: none).
        ordering: ``"natural"``, ``"random"`` or a permutation of ``range(D)`` (the generation order).
        direct: add a masked linear input-to-output connection.
        n_masks: how many connectivities (and, for ``random``, orderings) to hold.
        seed: seeds the degrees (and random orderings); the same seed gives the same masks.
    """

    def __init__(
        self,
        n_inputs: int,
        hidden_dims: Sequence[int],
        params_per_input: int = 1,
        context_dim: int = 0,
        ordering: str | Sequence[int] = "natural",
        direct: bool = False,
        n_masks: int = 1,
        seed: int = 0,
    ) -> None:
        super().__init__()
        hidden_dims = list(hidden_dims)
        if n_inputs < 1:
            raise ConfigError(f"MADE needs at least one input, got n_inputs={n_inputs}")
        if not hidden_dims or any(h < 1 for h in hidden_dims):
            raise ConfigError(f"MADE hidden_dims must be one or more positive layer widths, got {hidden_dims}")
        if params_per_input < 1:
            raise ConfigError(f"MADE params_per_input must be >= 1, got {params_per_input}")
        if context_dim < 0:
            raise ConfigError(f"MADE context_dim must be >= 0, got {context_dim}")
        if n_masks < 1:
            raise ConfigError(f"MADE n_masks must be >= 1, got {n_masks}")
        if isinstance(ordering, str) and ordering not in ORDERINGS:
            raise ConfigError(f"MADE ordering must be natural, random or a permutation, got {ordering!r}")
        if not isinstance(ordering, str) and sorted(ordering) != list(range(n_inputs)):
            raise ConfigError(f"MADE ordering must be a permutation of 0..{n_inputs - 1}, got {list(ordering)}")
        self.n_inputs, self.hidden_dims, self.params_per_input = n_inputs, hidden_dims, params_per_input
        self.context_dim, self.n_masks = context_dim, n_masks

        sizes = [n_inputs, *hidden_dims]
        self.hidden = nn.ModuleList(MaskedLinear(a, b) for a, b in zip(sizes[:-1], sizes[1:], strict=True))
        self.output = MaskedLinear(hidden_dims[-1], params_per_input * n_inputs)
        self.direct = MaskedLinear(n_inputs, params_per_input * n_inputs, bias=False) if direct else None
        self.context = nn.Linear(context_dim, hidden_dims[0], bias=False) if context_dim else None

        # The mask set, as degrees: inputs [n_masks, D], hidden layer l [n_masks, H_l].
        generator = torch.Generator().manual_seed(seed)
        degrees = [self._draw_degrees(ordering, generator) for _ in range(n_masks)]
        self.register_buffer("degrees_in", torch.stack([d[0] for d in degrees]))
        for i in range(len(hidden_dims)):
            self.register_buffer(f"degrees_hidden{i}", torch.stack([d[i + 1] for d in degrees]))
        self.register_buffer("mask_index", torch.tensor(0))
        self.set_mask(0)

    # ----- masks -------------------------------------------------------------------------------

    def _draw_degrees(self, ordering: str | Sequence[int], generator: torch.Generator) -> list[Tensor]:
        """One mask's degrees ``[inputs [D], hidden_1 [H_1], ...]``, redrawn until every input
        reaches an output and every output some input (when the ordering allows it)."""
        d_in = input_degrees(self.n_inputs, ordering, generator)
        low0 = 0 if self.context_dim else 1
        for _ in range(MAX_DRAWS):
            degrees, low = [d_in], low0
            for width in self.hidden_dims:
                high = max(low, self.n_inputs - 1)
                degrees.append(torch.randint(low, high + 1, (width,), generator=generator))
                low = int(degrees[-1].min())
            if self._connected(degrees):
                return degrees
        raise ConfigError(
            f"MADE hidden_dims {self.hidden_dims} are too narrow to connect all {self.n_inputs} inputs "
            f"(no mask in {MAX_DRAWS} draws): widen the hidden layers or use the direct connection"
        )

    def _masks(self, degrees: list[Tensor]) -> tuple[list[Tensor], Tensor, Tensor]:
        """``(hidden masks, output mask, direct mask)`` from the degrees, each ``[out, in]``."""
        d_in, hidden = degrees[0], degrees[1:]
        d_out = d_in.repeat(self.params_per_input)  # output p * D + d has input d's degree
        sources = [d_in, *hidden[:-1]]
        masks = [(cur[:, None] >= prev[None, :]).float() for prev, cur in zip(sources, hidden, strict=True)]
        return masks, (d_out[:, None] > hidden[-1][None, :]).float(), (d_out[:, None] > d_in[None, :]).float()

    def _connected(self, degrees: list[Tensor]) -> bool:
        """Whether, through the masks, every source that may feed an output feeds one and every
        output that may have a source has one (sources: the inputs, and the context as degree 0)."""
        hidden, out, direct = self._masks(degrees)
        d_in, d_out = degrees[0], degrees[0]
        if self.context_dim:  # the context: one more source, connected to every first-layer unit
            hidden[0] = torch.cat([hidden[0], torch.ones(len(hidden[0]), 1)], dim=1)
            direct = torch.cat([direct, torch.zeros(len(direct), 1)], dim=1)
            d_in = torch.cat([d_in, torch.zeros(1, dtype=torch.long)])
        paths = out[: self.n_inputs]
        for mask in reversed(hidden):
            paths = paths @ mask
        if self.direct is not None:
            paths = paths + direct[: self.n_inputs]
        reach, allowed = paths > 0, d_out[:, None] > d_in[None, :]
        return bool((reach.any(0) | ~allowed.any(0)).all() and (reach.any(1) | ~allowed.any(1)).all())

    def set_mask(self, index: int) -> None:
        """Use mask ``index`` of the set (``0 <= index < n_masks``)."""
        if not 0 <= index < self.n_masks:
            raise IndexError(f"mask index {index} out of range for {self.n_masks} masks")
        degrees = [self.degrees_in[index].cpu()]
        degrees += [getattr(self, f"degrees_hidden{i}")[index].cpu() for i in range(len(self.hidden_dims))]
        hidden, out, direct = self._masks(degrees)
        for layer, mask in zip(self.hidden, hidden, strict=True):
            layer.set_mask(mask)
        self.output.set_mask(out)
        if self.direct is not None:
            self.direct.set_mask(direct)
        self.mask_index.fill_(index)

    def next_mask(self) -> None:
        """Cycle to the next mask of the set."""
        self.set_mask((int(self.mask_index) + 1) % self.n_masks)

    @property
    def order(self) -> Tensor:
        """The current mask's input indices in generation order: ``[D]``."""
        return self.degrees_in[int(self.mask_index)].argsort()

    # ----- the network -------------------------------------------------------------------------

    def forward(self, x: Tensor, context: Tensor | None = None) -> Tensor:
        """``x [..., D]``, ``context [..., C]`` (broadcastable against ``x``'s leading dims;
        required when ``context_dim > 0``) ``-> [..., params_per_input, D]``."""
        h = self.hidden[0](x)
        if self.context is not None:
            if context is None:
                raise ValueError(f"this MADE takes a context of size {self.context_dim}")
            h = h + self.context(context)
        for layer in self.hidden[1:]:
            h = layer(F.relu(h))
        out = self.output(F.relu(h))
        if self.direct is not None:
            out = out + self.direct(x)
        return out.unflatten(-1, (self.params_per_input, self.n_inputs))
