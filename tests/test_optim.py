"""vaelab.optim, shared by every model: L2 on weight matrices only (frozen parameters left out),
and gradient clipping under bf16-mixed with a fused optimizer (which Lightning refuses)."""

from functools import partial

import pytest
import pytorch_lightning as pl
import torch
from test_semisup import tiny_m2
from test_vae import make_vae

from vaelab.made import MADEModel

MODELS = {
    "vae": lambda **kw: make_vae(**kw),
    "made": lambda **kw: MADEModel(partial(torch.optim.Adam, lr=1e-3), [16], n_masks=2, image_shape=(1, 4), **kw),
    "m2": lambda **kw: tiny_m2(**kw),
}


@pytest.mark.parametrize("name", MODELS)
def test_l2_decays_weight_matrices_only(name):
    model = MODELS[name](l2=1e-5)
    next(model.parameters()).requires_grad_(False)  # frozen (as M1 inside M1+M2): no group
    weights, others = model.configure_optimizers().param_groups
    assert weights["weight_decay"] == 1e-5 and others["weight_decay"] == 0.0
    assert all(p.ndim >= 2 for p in weights["params"]) and all(p.ndim == 1 for p in others["params"])
    assert len(weights["params"]) + len(others["params"]) == len(list(model.parameters())) - 1


@pytest.mark.parametrize("name", MODELS)
@pytest.mark.parametrize("algorithm", ["value", "norm"])
def test_gradients_are_clipped_under_bf16_mixed_with_a_fused_optimizer(name, algorithm):
    model = MODELS[name]()
    trainer = pl.Trainer(accelerator="cpu", precision="bf16-mixed", gradient_clip_val=0.01,
                         gradient_clip_algorithm=algorithm, logger=False, enable_checkpointing=False)
    model.trainer = trainer
    optimizer = torch.optim.Adam(model.parameters(), fused=True)
    for p in model.parameters():
        p.grad = torch.full_like(p, 3.0)
    model.configure_gradient_clipping(optimizer, trainer.gradient_clip_val, trainer.gradient_clip_algorithm)
    grads = torch.cat([p.grad.flatten() for p in model.parameters()])
    if algorithm == "value":
        assert torch.all(grads == 0.01)
    else:
        assert grads.norm().item() == pytest.approx(0.01, rel=1e-4)
