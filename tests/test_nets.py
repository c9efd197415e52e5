"""Encoder and decoder shapes and modes."""

import pytest
import torch
from conftest import MNIST

from vaelab.nets.mlp import MLPDecoder, MLPEncoder


@pytest.mark.parametrize("hidden_dims", [[500, 500], [64], [128, 64, 32]])
@pytest.mark.parametrize("latent_dim", [1, 2, 50])
def test_shapes(hidden_dims, latent_dim):
    enc = MLPEncoder(latent_dim, hidden_dims, image_shape=MNIST)
    dec = MLPDecoder(latent_dim, hidden_dims, image_shape=MNIST)
    mean, log_var = enc(torch.rand(4, 1, 28, 28))
    assert mean.shape == log_var.shape == (4, latent_dim)
    assert dec(mean).shape == (4, 1, 28, 28)
    assert dec(torch.randn(6, 4, latent_dim)).shape == (6, 4, 1, 28, 28)  # a sample dimension


def test_decoder_mirrors_encoder():
    enc, dec = MLPEncoder(10, [300, 100], image_shape=MNIST), MLPDecoder(10, [300, 100], image_shape=MNIST)
    assert [m.out_features for m in enc.net if isinstance(m, torch.nn.Linear)] == [300, 100, 20]
    assert [m.out_features for m in dec.net if isinstance(m, torch.nn.Linear)] == [100, 300, 784]


def test_dropout_only_in_training_mode():
    torch.manual_seed(0)
    enc, x = MLPEncoder(4, [64, 64], dropout=0.5, image_shape=MNIST), torch.rand(8, 1, 28, 28)
    enc.train()
    assert not torch.equal(enc(x)[0], enc(x)[0])
    enc.eval()
    torch.testing.assert_close(enc(x)[0], enc(x)[0], rtol=0, atol=0)


BAD = [{"latent_dim": 0}, {"latent_dim": 2, "dropout": 1.0}, {"latent_dim": 2, "hidden_dims": [0]}]


@pytest.mark.parametrize("kwargs", BAD)
def test_bad_arguments_raise(kwargs):
    with pytest.raises(ValueError):
        MLPEncoder(**kwargs, image_shape=MNIST)
