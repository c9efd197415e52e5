"""The convolutional encoder and decoder: shapes for any latent size and sample dimensions, no
dependence between the samples decoded together (so the IW estimate does not depend on how its
samples are chunked), model=conv on both data sets."""

import math

import pytest
import torch
from conftest import MNIST
from hydra.utils import instantiate
from torch import nn

from vaelab.likelihood import iw_estimates
from vaelab.likelihoods.logistic import DiscretizedLogistic
from vaelab.nets.conv import ConvDecoder, ConvEncoder
from vaelab.nets.mlp import MLPDecoder, MLPEncoder
from vaelab.train import train
from vaelab.vae import VAE

LEADING = [(4,), (3, 4), (2, 3, 4)]  # [B, D], [K, B, D], [2, 3, B, D]


@pytest.mark.parametrize("latent_dim", [1, 2, 50])
@pytest.mark.parametrize("leading", LEADING)
def test_shapes_for_any_sample_dimensions(latent_dim, leading):
    torch.manual_seed(0)
    enc = ConvEncoder(latent_dim, channels=(8, 16), image_shape=MNIST)
    dec = ConvDecoder(latent_dim, channels=(8, 16), image_shape=MNIST)
    mean, log_var = enc(torch.rand(*leading, 1, 28, 28))
    assert mean.shape == log_var.shape == (*leading, latent_dim)
    assert dec(torch.randn(*leading, latent_dim)).shape == (*leading, 1, 28, 28)


@pytest.mark.parametrize("image_shape", [(1, 28, 28), (3, 32, 32)])
@pytest.mark.parametrize("params_per_channel", [1, 2, 9])
@pytest.mark.parametrize("leading", LEADING)
@pytest.mark.parametrize("net", ["mlp", "conv"])
def test_every_net_on_grey_and_colour_images(net, leading, params_per_channel, image_shape):
    """The decoder returns the likelihood's ``P`` numbers per channel: ``[..., P * C, H, W]``."""
    encoder, decoder = (MLPEncoder, MLPDecoder) if net == "mlp" else (ConvEncoder, ConvDecoder)
    enc = encoder(6, hidden_dims=[16], image_shape=image_shape, context_dim=2)
    dec = decoder(6, hidden_dims=[16], image_shape=image_shape, params_per_channel=params_per_channel)
    mean, log_var, context = enc(torch.rand(*leading, *image_shape))
    assert mean.shape == log_var.shape == (*leading, 6) and context.shape == (*leading, 2)
    channels, height, width = image_shape
    assert dec(mean).shape == (*leading, params_per_channel * channels, height, width)


@pytest.mark.parametrize(
    "channels, kernel_sizes, hidden_dims, image_shape",
    [((32, 64), (4, 4), (256,), (1, 28, 28)), ((8, 16), (3, 3), (), (1, 28, 28)),
     ((4, 8, 8), (5, 3, 2), (32, 16), (1, 28, 28)), ((8,), (1,), (16,), (3, 32, 20)),
     ((4, 4, 4, 4), (3, 3, 3, 3), (), (1, 28, 28))],  # 28 -> 14 -> 7 -> 4 -> 2
)
def test_architectures_restore_the_image_size(channels, kernel_sizes, hidden_dims, image_shape):
    enc = ConvEncoder(5, channels, kernel_sizes, hidden_dims, image_shape=image_shape, context_dim=3)
    dec = ConvDecoder(5, channels, kernel_sizes, hidden_dims, image_shape=image_shape)
    mean, log_var, context = enc(torch.rand(2, *image_shape))
    assert (mean.shape, log_var.shape, context.shape) == ((2, 5), (2, 5), (2, 3))
    assert dec(mean).shape == (2, *image_shape)
    convs = [m for m in enc.modules() if isinstance(m, nn.Conv2d)]
    transposed = [m for m in dec.modules() if isinstance(m, nn.ConvTranspose2d)]
    assert [m.out_channels for m in convs] == list(channels)
    assert [m.in_channels for m in transposed] == list(reversed(channels))  # the mirror image
    assert transposed[-1].out_channels == image_shape[0]
    assert not any(isinstance(m, nn.modules.batchnorm._NormBase) for m in [*enc.modules(), *dec.modules()])


def test_default_is_two_stride_2_convolutions_and_a_dense_layer():
    enc = ConvEncoder(50, image_shape=MNIST)
    convs = [m for m in enc.modules() if isinstance(m, nn.Conv2d)]
    linears = [m for m in enc.modules() if isinstance(m, nn.Linear)]
    assert [(m.in_channels, m.out_channels, m.kernel_size, m.stride) for m in convs] == [
        (1, 32, (4, 4), (2, 2)), (32, 64, (4, 4), (2, 2))]
    assert [(m.in_features, m.out_features) for m in linears] == [(64 * 7 * 7, 256), (256, 100)]


BAD = [
    ({"latent_dim": 0}, "latent_dim must be positive"),
    ({"channels": ()}, "channels must be a non-empty list"),
    ({"channels": (8, 0)}, "channels must be"),
    ({"kernel_sizes": (3,)}, "one per entry of channels"),
    ({"kernel_sizes": (3, 0)}, "kernel_sizes must be positive"),
    ({"hidden_dims": (0,)}, "hidden_dims must be positive"),
    ({"dropout": 1.0}, "dropout must be in"),
    ({"image_shape": (28, 28)}, "image_shape must be"),
    ({"channels": (4,) * 6, "kernel_sizes": (2,) * 6}, "shrink a 28x28 image to nothing"),
]


@pytest.mark.parametrize("kwargs, message", BAD)
def test_bad_arguments_raise_one_clear_error(kwargs, message):
    args = {"latent_dim": 4, "channels": (8, 16), "kernel_sizes": (4, 4), "image_shape": MNIST, **kwargs}
    for net in (ConvEncoder, ConvDecoder):
        with pytest.raises(ValueError, match=message):
            net(**args)
    with pytest.raises(ValueError, match="context_dim"):
        ConvEncoder(4, context_dim=-1, image_shape=MNIST)


def test_dropout_only_in_training_mode():
    torch.manual_seed(0)
    dec, z = ConvDecoder(4, (8, 16), dropout=0.5, image_shape=MNIST), torch.randn(3, 4)
    assert not torch.equal(dec(z), dec(z))
    dec.eval()
    assert torch.equal(dec(z), dec(z))


def chunked_decode(dec: nn.Module, z: torch.Tensor) -> torch.Tensor:
    """Decode ``z [K, B, D]`` in pieces of every size: samples 0..2 of all images, then each
    remaining sample of images 0..1 and of the rest separately."""
    head = dec(z[:3])
    rest = [torch.cat([dec(z[k : k + 1, :2]), dec(z[k : k + 1, 2:])], dim=1) for k in range(3, len(z))]
    return torch.cat([head, *rest])


def with_batch_norm(dec: ConvDecoder) -> ConvDecoder:
    """The same decoder with a BatchNorm after its first transposed convolution."""
    i = next(i for i, m in enumerate(dec.net) if isinstance(m, nn.ConvTranspose2d))
    dec.net.insert(i + 1, nn.BatchNorm2d(dec.net[i].out_channels))
    return dec


@pytest.mark.parametrize("batch_norm", [False, True])
def test_decoded_samples_do_not_depend_on_each_other(batch_norm):
    """In training mode (where a layer with batch statistics uses them) each sample's logits are
    the same whichever samples share its forward pass; with a BatchNorm they are not, which shows
    that the comparison can tell."""
    torch.manual_seed(0)
    dec = ConvDecoder(6, (8, 16), hidden_dims=(32,), image_shape=MNIST).train()
    dec = with_batch_norm(dec) if batch_norm else dec
    z = torch.randn(7, 5, 6)
    same = torch.allclose(dec(z), chunked_decode(dec, z), rtol=1e-5, atol=1e-5)
    assert same != batch_norm


class FixedNoise:
    """``model.log_densities`` for :func:`iw_estimates`, with the noise of the ``j``-th sample of
    image ``i`` of ``x`` always ``noise[j, i]``, however the estimator chunks images and samples
    (it splits ``x`` in order and draws each image's samples in order): ``torch.randn`` is
    replaced by that slice for the duration of the model's call."""

    def __init__(self, model: VAE, x: torch.Tensor, noise: torch.Tensor, monkeypatch: pytest.MonkeyPatch) -> None:
        self.model, self.x, self.noise, self.monkeypatch = model, x, noise, monkeypatch
        self.drawn = [0] * len(x)  # samples drawn so far, per image

    def log_densities(self, xb: torch.Tensor, n: int) -> tuple[torch.Tensor, ...]:
        first = int((self.x.flatten(1) == xb[0].flatten()).all(1).nonzero()[0])
        images = range(first, first + len(xb))
        start = self.drawn[first]
        assert all(self.drawn[i] == start for i in images)
        eps = self.noise[start : start + n, first : first + len(xb)]

        def randn(shape, **kwargs):
            assert tuple(shape) == eps.shape
            return eps.clone()

        with self.monkeypatch.context() as patch:
            patch.setattr(torch, "randn", randn)
            terms = self.model.log_densities(xb, n)
        for i in images:
            self.drawn[i] += n
        return terms


@pytest.mark.parametrize("batch_norm", [False, True])
def test_iw_estimate_is_the_same_for_any_chunking(batch_norm, monkeypatch):
    """K = 20 samples of 6 images, decoded all at once, one image at a time, 2 images at a time,
    and 7 samples at a time: the same samples give the same estimates (to float rounding). The
    model is in training mode, so that a BatchNorm would use the statistics of each chunk: with
    one the estimates differ."""
    torch.manual_seed(0)
    dec = ConvDecoder(4, (8, 16), hidden_dims=(32,), image_shape=MNIST)
    dec = with_batch_norm(dec) if batch_norm else dec
    enc = ConvEncoder(4, (8, 16), hidden_dims=(32,), image_shape=MNIST)
    model = VAE(enc, dec, torch.optim.Adam, latent_dim=4).train()
    x = torch.bernoulli(torch.rand(6, 1, 28, 28))
    noise = torch.randn(20, 6, 4)
    runs = []
    for chunk_size in (120, 20, 45, 7):
        fixed = FixedNoise(model, x, noise, monkeypatch)
        runs.append(iw_estimates(fixed, x, 20, chunk_size))
        assert fixed.drawn == [20] * 6
    assert all(e.log_px.isfinite().all() for e in runs)
    same = all(torch.allclose(a, b, rtol=0, atol=1e-3) for run in runs[1:] for a, b in zip(runs[0], run, strict=True))
    assert same != batch_norm


def test_iw_estimate_of_a_colour_model_is_the_same_for_any_chunking(monkeypatch):
    """As above for 3x32x32 images under a discretized logistic mixture: one chunk or many."""
    torch.manual_seed(0)
    shape = (3, 32, 32)
    likelihood = DiscretizedLogistic(n_mix=2)
    enc = ConvEncoder(4, (8, 16), hidden_dims=(32,), image_shape=shape)
    per_channel = likelihood.params_per_channel
    dec = ConvDecoder(4, (8, 16), hidden_dims=(32,), image_shape=shape, params_per_channel=per_channel)
    model = VAE(enc, dec, torch.optim.Adam, latent_dim=4, likelihood=likelihood).eval()
    x = torch.randint(0, 256, (6, *shape)).float() / 255
    noise = torch.randn(20, 6, 4)
    runs = [iw_estimates(FixedNoise(model, x, noise, monkeypatch), x, 20, chunk) for chunk in (120, 20, 45, 7)]
    assert all(e.log_px.isfinite().all() for e in runs)
    for run in runs[1:]:
        for a, b in zip(runs[0], run, strict=True):
            torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-3)


def test_conv_vae_trains_on_mnist_and_fashion_mnist(make_cfg, tmp_path):
    for dataset in ("mnist", "fashion_mnist"):
        cfg = make_cfg(f"data={dataset}", "model=conv", "model.iw_samples_test=10", "logger=none",
                       "callbacks=none", output_dir=tmp_path / dataset)
        assert cfg.model.encoder._target_ == "vaelab.nets.conv.ConvEncoder"
        metrics = train(cfg)
        assert math.isfinite(metrics["test/elbo"]) and math.isfinite(metrics["test/nll"])
        assert metrics["test/nll"] <= -metrics["test/elbo"] + 5


def test_conv_config_is_the_mlp_configs_interface(make_cfg):
    """model=conv reads the same top-level keys as model=mlp and gives the encoder the posterior's
    context size."""
    cfg = make_cfg("model=conv", "latent_dim=7", "dropout=0.2", "l2=1e-5", "lr=0.01")
    mlp = make_cfg()
    assert set(cfg.model) == set(mlp.model)
    assert set(cfg.model.encoder) - {"channels", "kernel_sizes"} == set(mlp.model.encoder) - {"weight_dropout"}
    assert cfg.model.encoder.latent_dim == cfg.model.decoder.latent_dim == 7
    assert cfg.model.encoder.dropout == cfg.model.decoder.dropout == 0.2
    assert (cfg.model.l2, cfg.model.optimizer.lr, cfg.model.encoder.context_dim) == (1e-5, 0.01, 0)
    assert make_cfg("model=conv", "+model.posterior.context_dim=4").model.encoder.context_dim == 4
    model = instantiate(cfg.model)
    assert isinstance(model.encoder, ConvEncoder) and isinstance(model.decoder, ConvDecoder)
    assert list(model.decoder.net[0].parameters())[0].shape == (32, 7)  # TINY's hidden_dims=[32]
