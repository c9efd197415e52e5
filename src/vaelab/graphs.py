"""A call's K optimizer steps captured once as a CUDA graph and replayed (``cuda_graphs: true``).

On a GPU a small model's step is a few hundred kernel launches, each a few microseconds of CPU
work, and the GPU waits on them. With ``steps_per_call: K`` one ``training_step`` takes K steps on
batches of one shape, so the whole call (K forward and backward passes, gradient clipping and
optimizer steps) can be recorded once with ``torch.cuda.graph`` and replayed: one launch for the
call. :class:`GraphedSteps` does that for :class:`vaelab.optim.Optimization`:

- the first full call runs eagerly, on a side stream (CUDA's warm-up: the optimizer's state and
  the libraries' workspaces are made there, outside any graph); the second is captured; every
  later full call copies its batches into the captured input buffers (the K-batch transfer fills
  them, one copy per tensor) and replays;
- what a step reads from the host is a tensor in the graph: the optimizer step the schedules
  read (the KL warm-up; :attr:`vaelab.optim.Optimization.schedule_step`) is a counter on the
  device, set before each replay and advanced inside it; Adam runs with ``capturable=True``;
- each step's loss and training metrics are written to output buffers, read after the replay;
- a call the graph cannot take runs eagerly, as without graphs: a call of another shape (the
  epoch's last, shorter one), one that ``max_steps`` ends inside, and one in which a callback
  wants to look at the model between steps (the log-spaced pictures of the first epoch,
  :meth:`vaelab.callbacks.pictures.Pictures.draws_at`; :func:`watchers`). The eager steps keep
  the gradient tensors the graph writes into (``zero_grad(set_to_none=False)``).

The random draws inside the graph (reparameterization noise, dropout) come from the CUDA
generator, which advances at each replay as it would eagerly; the numbers are those of the eager
steps up to the order of floating-point reductions. Lightning counts the optimizer steps as it
does for the wrapped optimizer's ``step()`` (the manual-optimization loop's hooks).

On a CPU (the tests) the same machinery runs without a graph (:func:`machinery`): the "capture"
is the K-step function itself, run eagerly on the static buffers and counters at each replay.
Users get ``cuda_graphs=true`` only with a CUDA GPU (:func:`check`).
"""

import logging
from collections.abc import Callable, Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager, nullcontext
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf
from pytorch_lightning import Callback
from torch import Tensor
from torch.utils._pytree import tree_flatten, tree_unflatten

from vaelab.config import ConfigError

log = logging.getLogger(__name__)
STEP_HOOKS = ("on_before_backward", "on_after_backward", "on_before_optimizer_step")

Outputs = tuple[Tensor, Tensor]  # losses [K], metrics [K, M]
Capture = Callable[[Callable[[], Outputs]], Callable[[], Outputs]]


def cuda_graph(steps: Callable[[], Outputs]) -> Callable[[], Outputs]:
    """Record ``steps`` (nothing runs) as a CUDA graph; return its replay, which runs the
    recorded kernels and returns the output buffers they fill."""
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        outputs = steps()

    def replay() -> Outputs:
        graph.replay()
        return outputs

    return replay


@contextmanager
def side_stream() -> Iterator[None]:
    """CUDA's warm-up before a capture: run on a side stream, then join it (torch.cuda.graphs docs)."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        yield
    torch.cuda.current_stream().wait_stream(stream)


def machinery(device: torch.device) -> tuple[Capture, Callable[[], AbstractContextManager]]:
    """``(capture, warm_up)`` for ``device``: a CUDA graph on CUDA; elsewhere (the tests, on a CPU)
    the K-step function itself, run eagerly on the same static buffers and counters at each replay."""
    if device.type == "cuda":
        return cuda_graph, side_stream
    return (lambda steps: steps), nullcontext


class GraphedSteps:
    """K optimizer steps of ``module`` on static batches, captured once and replayed.

    Args:
        module: the :class:`vaelab.optim.Optimization` whose steps these are.
        optimizer: the torch optimizer (not Lightning's wrapper); made ``capturable`` on CUDA here,
            after a resumed run's optimizer state (which holds the flag) is restored.
        watchers: the callbacks with hooks inside a step (:func:`watchers`).
    """

    def __init__(self, module: Any, optimizer: torch.optim.Optimizer, watchers: Sequence[Callback] = ()) -> None:
        self.module, self.optimizer, self.watchers = module, optimizer, list(watchers)
        self.capture, self.warm_up = machinery(module.device)
        if module.device.type == "cuda":
            for group in optimizer.param_groups:  # its step count on the device, so that a graph can hold it
                group["capturable"] = True
        self.replay: Callable[[], Outputs] | None = None
        self.shapes: list[tuple] | None = None  # of the warm-up call's tensors: what the graph takes
        self.spec: Any = None
        self.inputs: list[Tensor] = []
        self.metric_names: list[str] = []
        self.step = torch.zeros((), dtype=torch.long, device=module.device)  # the schedules' step

    def takes(self, batches: Sequence[Any]) -> bool:
        """Whether ``batches`` are all of one shape (not an epoch's last, partial batch) and, once
        there is a graph, of the shapes it was made for."""
        leaves, spec = tree_flatten(list(batches))
        shapes = [(t.shape, t.dtype) for t in leaves]
        per_batch = len(shapes) // len(batches)
        if any(shapes[i] != shapes[i % per_batch] for i in range(len(shapes))):
            return False
        return self.shapes is None or (spec == self.spec and shapes == self.shapes)

    def __call__(self, batches: Sequence[Any], first_step: int) -> tuple[Tensor, dict[str, Tensor]]:
        """The K steps on ``batches`` from optimizer step ``first_step``: the losses ``[K]`` and
        each training metric's values ``{name: [K]}``."""
        leaves, spec = tree_flatten(list(batches))
        self.step.fill_(first_step)
        if self.shapes is None:  # the warm-up call, eagerly
            self.shapes, self.spec = [(t.shape, t.dtype) for t in leaves], spec
            with self.warm_up():
                losses, metrics = self._steps(list(batches))
            return self._named(losses.clone(), metrics.clone())
        if self.replay is None:
            self.inputs = [t.clone() for t in leaves]
            static = tree_unflatten(self.inputs, spec)
            self.replay = self.capture(lambda: self._steps(static))
        else:
            for buffer, t in zip(self.inputs, leaves, strict=True):
                buffer.copy_(t)
        losses, metrics = self.replay()
        return self._named(losses.clone(), metrics.clone())

    def _steps(self, batches: list[Any]) -> Outputs:
        """The K optimizer steps, as the eager loop takes them, with nothing read back to the host."""
        module, optimizer = self.module, self.optimizer
        losses, metrics = [], []
        module.schedule_step_tensor = self.step
        try:
            for batch in batches:
                loss, values = module.training_loss(batch, log=True)
                optimizer.zero_grad(set_to_none=False)
                module.manual_backward(loss)
                if module.gradient_clip_val:
                    module.configure_gradient_clipping(optimizer, module.gradient_clip_val,
                                                       module.gradient_clip_algorithm)
                optimizer.step()
                self.step.add_(1)
                self.metric_names = list(values)
                losses.append(loss.detach().float())
                metrics.append(torch.stack([v.detach().float() if isinstance(v, Tensor)
                                            else torch.full((), v, device=loss.device) for v in values.values()])
                               if values else loss.new_zeros(0))
        finally:
            module.schedule_step_tensor = None
        return torch.stack(losses), torch.stack(metrics)

    def _named(self, losses: Tensor, metrics: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        return losses, {name: metrics[:, i] for i, name in enumerate(self.metric_names)}


def watchers(callbacks: Sequence[Callback]) -> list[Callback]:
    """The callbacks with hooks inside an optimizer step (``on_before_backward``,
    ``on_after_backward``, ``on_before_optimizer_step``), which a replayed graph does not call:
    a call holding a step at which one has something to do runs eagerly. A callback says at which
    steps with ``draws_at(trainer, step)`` (the log-spaced pictures); one that does not is taken to
    want every step, so with it no call is graphed (a warning says so)."""
    found = [c for c in callbacks if any(getattr(type(c), hook) is not getattr(Callback, hook) for hook in STEP_HOOKS)]
    for callback in found:
        if not hasattr(callback, "draws_at"):
            log.warning("cuda_graphs: %s has hooks inside each optimizer step, so every call runs eagerly; "
                        "remove it to use the graph", type(callback).__name__)
    return found


def check(cfg: DictConfig) -> bool:
    """``cuda_graphs`` of a run config, checked: a boolean, and where true, a configuration that a
    graph can hold (one CUDA device, one MADE mask).
    Raises :class:`ConfigError` with what to change."""
    enabled = OmegaConf.select(cfg, "cuda_graphs", default=False)
    if not isinstance(enabled, bool):
        raise ConfigError(f"cuda_graphs must be true or false, got {enabled!r}")
    if not enabled:
        return False
    accelerator = str(OmegaConf.select(cfg, "trainer.accelerator", default="auto"))
    on_cuda = accelerator in ("gpu", "cuda") or (accelerator == "auto" and torch.cuda.is_available())
    if not on_cuda:
        raise ConfigError(f"cuda_graphs=true needs a CUDA GPU (trainer.accelerator={accelerator}"
                          f"{', and none is visible' if accelerator == 'auto' else ''}): set cuda_graphs=false")
    devices = OmegaConf.select(cfg, "trainer.devices", default=1)
    nodes = OmegaConf.select(cfg, "trainer.num_nodes", default=1)
    if devices not in (1, [0], "1") or nodes != 1:
        raise ConfigError(f"cuda_graphs=true runs on one GPU (trainer.devices={devices}, num_nodes={nodes}): "
                          "DDP's gradient hooks are not captured here; set cuda_graphs=false or trainer=gpu")
    if OmegaConf.select(cfg, "model.n_masks", default=1) != 1:
        raise ConfigError("cuda_graphs=true cannot cycle MADE's masks (model.n_masks > 1: each step's mask is "
                          "chosen on the host); set model.n_masks=1 or cuda_graphs=false")
    return True
