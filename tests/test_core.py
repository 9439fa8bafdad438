"""Invariants of the config, the VAE, the frozen perceptual network and the loss."""

import copy
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import yaml

from dfcvae.config import Config, ConfigError, LossConfig, ModelConfig
from dfcvae.features import BACKBONES, PerceptualNetwork, resolve_layers
from dfcvae.loss import dfc_vae_loss, kl_divergence
from dfcvae.model import DFCVAE

ROOT = Path(__file__).resolve().parents[1]
TINY = ModelConfig(hidden_channels=(8, 16), latent_dim=8)


@pytest.fixture(scope="module")
def mobilenet() -> PerceptualNetwork:
    return PerceptualNetwork("mobilenet_v2", ["vae123"], "imagenet")


def test_committed_params_load_and_round_trip():
    cfg = Config.load(ROOT / "params.yaml")
    assert Config.from_dict(cfg.to_dict()) == cfg
    assert cfg.global_batch_size == cfg.loader.batch_size * cfg.scaling.num_workers
    assert all("." in key for key in cfg.flat())


def test_misspelt_key_names_key_and_section(tmp_path):
    raw = yaml.safe_load((ROOT / "params.yaml").read_text())
    raw["optim"]["lerning_rate"] = 0.1
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(raw))
    with pytest.raises(ConfigError, match=r"unknown key 'lerning_rate' in section 'optim'"):
        Config.load(tmp_path / "params.yaml")


def test_wrong_type_and_unknown_override_fail():
    with pytest.raises(ConfigError, match=r"loss.kl_weight: expected a number"):
        Config.from_dict({"loss": {"kl_weight": "high"}})
    with pytest.raises(ConfigError, match=r"unknown key 'alpha' in section 'loss'"):
        Config().with_overrides({"loss.alpha": 1.0})
    assert Config().with_overrides({"loss.kl_weight": 2}).loss.kl_weight == 2.0


@pytest.mark.parametrize("size", [32, 64, 128])
def test_model_shapes_and_range(size):
    model = DFCVAE(ModelConfig(hidden_channels=(8, 16, 32), latent_dim=8), size)
    x = torch.rand(2, 3, size, size) * 2 - 1
    recon, mu, logvar = model(x)
    assert recon.shape == x.shape and mu.shape == logvar.shape == (2, 8)
    assert recon.abs().max() <= 1
    assert model.sample(3, torch.Generator().manual_seed(0)).shape == (3, 3, size, size)


def test_indivisible_image_size_is_a_clear_error():
    with pytest.raises(ValueError, match="not divisible"):
        DFCVAE(TINY, 30)


def test_kl_is_nonnegative_and_zero_at_prior():
    assert kl_divergence(torch.zeros(4, 8), torch.zeros(4, 8)).item() == 0.0
    mu, logvar = torch.randn(64, 8), torch.randn(64, 8)
    assert kl_divergence(mu, logvar).item() > 0


@pytest.mark.parametrize("backbone", ["vgg19_bn", "vgg19", "vgg16"])
def test_named_vgg_layers_match_torchvision_sequence(backbone):
    torch.manual_seed(0)
    net = PerceptualNetwork(backbone, ["relu1_1", "relu2_1", "relu3_1", "relu3_2"], "random")
    reference = copy.deepcopy(net.body).eval()
    names = BACKBONES[backbone].layer_names(BACKBONES[backbone].build())
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    feats = net(x)
    assert list(feats) == ["relu1_1", "relu2_1", "relu3_1", "relu3_2"]
    for name, value in feats.items():
        i = names.index(name)
        expected = reference[: i + 1](net.normalize(x))
        assert isinstance(reference[i], torch.nn.ReLU)
        torch.testing.assert_close(value, expected, rtol=0, atol=0)
    # Truncated after the deepest requested layer.
    assert len(net.body) == names.index("relu3_2") + 1


def test_bn_and_plain_vgg_indices_differ_as_torchvision():
    bn = BACKBONES["vgg19_bn"].layer_names(BACKBONES["vgg19_bn"].build())
    plain = BACKBONES["vgg19"].layer_names(BACKBONES["vgg19"].build())
    assert (bn.index("relu1_1"), bn.index("relu2_1"), bn.index("relu3_1"), bn.index("relu5_4")) == (2, 9, 16, 51)
    assert (plain.index("relu1_1"), plain.index("relu2_1"), plain.index("relu3_1"), plain.index("relu5_4")) == (1, 6, 11, 35)
    assert resolve_layers("vgg19", ["vae345"]) == ("relu3_1", "relu4_1", "relu5_1")


def test_unknown_layer_lists_valid_names():
    with pytest.raises(ValueError, match=r"unknown layer 'relu9_1'.*relu1_1.*relu5_4"):
        PerceptualNetwork("vgg19", ["relu9_1"], "random")
    with pytest.raises(ValueError, match="unknown perceptual backbone"):
        PerceptualNetwork("resnet", ["vae123"], "random")


def test_missing_imagenet_file_names_expected_path(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    monkeypatch.setattr(torch.hub, "_hub_dir", None)
    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", _offline)
    with pytest.raises(FileNotFoundError, match=r"vgg16-397923af\.pth"):
        PerceptualNetwork("vgg16", ["vae123"], "imagenet")


def _offline(*args, **kwargs):
    raise OSError("network unreachable")


def test_local_weight_file_loads(tmp_path):
    source = PerceptualNetwork("vgg16", ["relu2_1"], "random")
    full = BACKBONES["vgg16"].build()
    full[: len(source.body)].load_state_dict(source.body.state_dict())
    torch.save({f"features.{k}": v for k, v in full.state_dict().items()}, tmp_path / "w.pth")
    loaded = PerceptualNetwork("vgg16", ["relu2_1"], str(tmp_path / "w.pth"))
    x = torch.rand(1, 3, 16, 16) * 2 - 1
    torch.testing.assert_close(loaded(x)["relu2_1"], source(x)["relu2_1"])


def test_perceptual_term_zero_on_identity_and_grows_with_distortion(mobilenet):
    torch.manual_seed(0)
    x = _edge_images(4)
    other = _edge_images(4)
    noisy = (x + 0.05 * torch.randn_like(x)).clamp(-1, 1)
    blurred = F.avg_pool2d(F.pad(x, (2, 2, 2, 2), mode="replicate"), 5, stride=1)
    cfg = LossConfig(kl_weight=0.0, perceptual_weight=1.0)
    zeros = torch.zeros(4, 8)

    def distance(recon):
        return dfc_vae_loss(x, recon, zeros, zeros, mobilenet, cfg)[1]["train/perceptual"].item()

    assert distance(x) == 0.0
    assert 0 < distance(noisy) < distance(blurred) < distance(other)


def _edge_images(n):
    # Colour regions with sharp edges: structure that ImageNet features respond to.
    grid = torch.linspace(-1, 1, 64)
    yy, xx = torch.meshgrid(grid, grid, indexing="ij")
    phase = torch.rand(n, 3, 1, 1) * 6
    return 0.8 * torch.sign(torch.sin(3 * xx + phase) * torch.cos(2 * yy - phase))


def test_training_step_leaves_frozen_network_bit_identical():
    perceptual = PerceptualNetwork("vgg19_bn", ["vae123"], "random")
    model = DFCVAE(TINY, 32)
    parent = torch.nn.ModuleDict({"vae": model, "perceptual": perceptual})
    parent.train()
    assert not perceptual.training and all(not m.training for m in perceptual.modules())
    before = {k: v.clone() for k, v in perceptual.state_dict().items()}
    assert any("running_mean" in k for k in before)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    x = torch.rand(4, 3, 32, 32) * 2 - 1
    recon, mu, logvar = model(x)
    loss, _ = dfc_vae_loss(x, recon, mu, logvar, perceptual, LossConfig())
    loss.backward()
    assert model.decoder.head[1].weight.grad.abs().sum() > 0  # reached the decoder via Phi
    assert all(p.grad is None and not p.requires_grad for p in perceptual.parameters())
    optimizer.step()
    for key, value in perceptual.state_dict().items():
        assert torch.equal(value, before[key]), key


def test_target_features_build_no_graph(mobilenet):
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    recon = (x * 0.9).requires_grad_(True)
    seen = []
    handle = mobilenet.body[0].register_forward_hook(lambda m, i, o: seen.append(o.requires_grad))
    loss, _ = dfc_vae_loss(x, recon, torch.zeros(2, 8), torch.zeros(2, 8), mobilenet, LossConfig())
    handle.remove()
    assert seen == [False, True]  # target pass without graph, reconstruction pass with
    loss.backward()
    assert recon.grad is not None and recon.grad.abs().sum() > 0


def test_vae_state_dict_holds_no_perceptual_tensors():
    model = DFCVAE(TINY, 32)
    keys = list(model.state_dict())
    assert keys and all(k.startswith(("encoder.", "decoder.")) for k in keys)
    assert not any(isinstance(m, PerceptualNetwork) for m in model.modules())


def test_loss_under_bf16_autocast_is_float32_and_close():
    torch.manual_seed(0)
    perceptual = PerceptualNetwork("vgg19_bn", ["vae123"], "random")
    model = DFCVAE(TINY, 32)
    x = torch.rand(4, 3, 32, 32) * 2 - 1
    torch.manual_seed(1)
    loss32, _ = dfc_vae_loss(x, *model(x), perceptual, LossConfig())
    torch.manual_seed(1)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss16, logs = dfc_vae_loss(x, *model(x), perceptual, LossConfig())
    assert loss16.dtype == torch.float32 and logs["train/kl"].dtype == torch.float32
    assert abs(loss16.item() - loss32.item()) / loss32.item() < 0.05


def test_plain_vae_needs_no_perceptual_network():
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    cfg = LossConfig(kl_weight=1.0, perceptual_weight=0.0, pixel_weight=1.0)
    loss, logs = dfc_vae_loss(x, x.clone(), torch.zeros(2, 8), torch.zeros(2, 8), None, cfg)
    assert loss.item() == 0.0 and "train/perceptual" not in logs
