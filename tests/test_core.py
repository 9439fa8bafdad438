"""Invariants of the config, the VAE, the frozen perceptual network and the loss."""

import copy
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import yaml
from torch import Tensor

from dfcvae.config import (
    PAPER_NETWORK,
    STORED_BEFORE_FIELD,
    Config,
    ConfigError,
    LossConfig,
    ModelConfig,
    load_yaml,
    render_params,
)
from dfcvae.features import BACKBONES, Blur, PerceptualNetwork, layer_strides, resolve_layers
from dfcvae.loss import dfc_vae_loss, feature_distances, kl_divergence, kl_warmup, perceptual_term, shifted_crops
from dfcvae.metrics import active_units, lattice_peak, nyquist_power, phase_energy
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


def test_params_yaml_is_written_from_the_dataclass_defaults():
    """One source: the dataclass defaults. params.yaml is written from them (`make params`), so
    Config() (used by bench/ and tests) is the job params.yaml describes."""
    text = (ROOT / "params.yaml").read_text()
    assert render_params(text) == text, "params.yaml is not dfcvae/config.py's defaults: run `make params`."
    assert Config() == Config.load(ROOT / "params.yaml")


def test_writing_params_changes_only_what_the_defaults_changed():
    text = (ROOT / "params.yaml").read_text()
    edited = text.replace("  lpips_net: alex\n", "", 1).replace(
        "  kl_warmup_steps: 0\n", "  kl_warmup_steps: 0\n  alpha: 2\n"
    )
    assert edited.count("lpips_net") == text.count("lpips_net") - 1 and "alpha: 2" in edited
    cfg = Config().with_overrides({"loss.kl_weight": 0.5, "data.split_fractions": [0.7, 0.2, 0.1]})
    rendered = render_params(edited, cfg)
    assert Config.from_dict(load_yaml(rendered)) == cfg  # the removed key back, the stray one gone
    changed = [line for line in rendered.splitlines() if line not in text.splitlines()]
    assert changed == ["  split_fractions: [0.7, 0.2, 0.1]", "  kl_weight: 0.5"]  # the rest as written
    assert [line for line in text.splitlines() if line not in rendered.splitlines()] == [
        "  split_fractions: [0.8, 0.1, 0.1]",
        "  kl_weight: 0.003",
    ]
    assert render_params(rendered, cfg) == rendered
    last = '  socket_ifname: ""\n'  # a section's last key: it goes back before the blank line that ends the section
    assert last in text and render_params(text.replace(last, "")) == text


def test_a_stored_config_without_later_keys_keeps_its_meaning():
    stored = Config().to_dict()
    for dotted in STORED_BEFORE_FIELD:
        section, key = dotted.split(".")
        del stored[section][key]
    old = Config.from_stored(stored)
    assert (old.model.upsample, old.model.encoder_kernel, old.loss.feature_norm) == ("transposed", 3, "none")
    assert Config.from_stored(Config().to_dict()) == Config()  # a full config is read as written
    assert Config.from_dict(stored).model.upsample == Config().model.upsample  # not for params


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


@pytest.mark.parametrize(
    "text, value",
    [
        ("1e-5", 1e-5),
        ("1e5", 1e5),
        ("1.0e-3", 1e-3),
        ("-2E+3", -2000.0),
        ("1e-05", 1e-5),
        (".5", 0.5),
        ("10", 10),
        ("1_000", 1000),
        ("0x10", 16),
        ("-.inf", float("-inf")),
        ("true", True),
        ("1e", "1e"),
        ("yes", "yes"),  # YAML 1.1 (PyYAML) reads a boolean
    ],
)
def test_numbers_read_as_yaml_1_2_dvc_and_people_write_them(text, value):
    assert load_yaml(text) == value and type(load_yaml(text)) is type(value)


def test_a_key_given_twice_is_an_error_that_says_where(tmp_path):
    (tmp_path / "params.yaml").write_text("loss:\n  kl_weight: 0.1\n  kl_weight: 0.2\n")
    with pytest.raises(ConfigError, match=r'not valid YAML at line 3, column 3 \(found duplicate key "kl_weight"'):
        Config.load(tmp_path / "params.yaml")


def test_exponent_numbers_in_params_and_overrides(tmp_path):
    raw = yaml.safe_load((ROOT / "params.yaml").read_text())
    text = yaml.safe_dump(raw).replace("lr: 0.001", "lr: 1e-3")
    assert "lr: 1e-3" in text
    (tmp_path / "params.yaml").write_text(text + "\n")
    assert Config.load(tmp_path / "params.yaml").optim.lr == 1e-3
    from pipeline.common import parse_overrides

    assert Config().with_overrides(parse_overrides(["loss.kl_weight=1e-5"])).loss.kl_weight == 1e-5


@pytest.mark.parametrize("value, expected", [(1e3, 1000), ("20000", 20000), (7, 7)])
def test_integers_may_be_written_as_numbers_people_write(value, expected):
    steps = Config().with_overrides({"train.steps": value}).train.steps
    assert steps == expected and type(steps) is int


@pytest.mark.parametrize("value", [1.5, "abc", float("inf"), True, None])
def test_what_is_not_an_integer_is_refused(value):
    with pytest.raises(ConfigError, match="train.steps: expected an integer"):
        Config().with_overrides({"train.steps": value})


@pytest.mark.parametrize(
    "stage, override, message",
    [
        ("train", "loss.kl_weight=high", "train: overrides: loss.kl_weight: expected a number, got 'high'."),
        (
            "train",
            "data.image_size=65",
            "train: image size 65 is not divisible by 2**5 = 32: choose data.image_size as "
            "a multiple of 32 or use fewer model.hidden_channels.",
        ),
        (
            "train",
            "model.upsample=bicubic",
            "train: overrides: model.upsample: 'bicubic' is not one of nearest, bilinear, transposed; pick one.",
        ),
        (
            "fetch",
            "data.source=flickr",
            "fetch: overrides: data.source: 'flickr' is not one of celeba, synthetic, folder; pick one.",
        ),
    ],
)
@pytest.mark.slow
def test_a_config_mistake_is_one_line_without_traceback(stage, override, message):
    result = subprocess.run(
        [sys.executable, "-m", f"pipeline.{stage}", "--set", override, "--set", "tune.enabled=false"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 1 and result.stderr.strip().splitlines() == [message], result.stderr


@pytest.mark.parametrize("size", [32, 64, 128])
@pytest.mark.parametrize("architecture", [{}, {"upsample": "nearest", "encoder_kernel": 4, "init": "dcgan"}])
def test_model_shapes_and_range(size, architecture):
    model = DFCVAE(ModelConfig(hidden_channels=(8, 16, 32), latent_dim=8, **architecture), size)
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
    assert (plain.index("relu1_1"), plain.index("relu2_1"), plain.index("relu3_1"), plain.index("relu5_4")) == (
        1,
        6,
        11,
        35,
    )
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
    loss, _ = dfc_vae_loss(x, recon, mu, logvar, perceptual, LossConfig(pixel_weight=0.0))
    loss.backward()
    head = [m for m in model.decoder.head.modules() if isinstance(m, torch.nn.Conv2d)][-1]
    assert head.weight.grad.abs().sum() > 0  # reached the decoder via Phi
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


def test_paper_network_has_no_transposed_conv_and_dcgan_init():
    cfg = Config().with_overrides(PAPER_NETWORK)
    assert cfg.optim.betas == (0.5, 0.999) and (cfg.model.latent_dim, cfg.model.full_res_convs) == (100, 0)
    torch.manual_seed(0)
    model = DFCVAE(cfg.model, 64)
    assert not any(isinstance(m, torch.nn.ConvTranspose2d) for m in model.modules())
    assert sum(isinstance(m, torch.nn.Upsample) and m.mode == "nearest" for m in model.modules()) == 5
    assert all(m.kernel_size == (4, 4) for m in model.encoder.convs.modules() if isinstance(m, torch.nn.Conv2d))
    weights = torch.cat([m.weight.flatten() for m in model.modules() if isinstance(m, torch.nn.Conv2d)])
    assert abs(float(weights.std()) - 0.02) < 0.002 and abs(float(weights.mean())) < 0.002
    with pytest.raises(ValueError, match="model.upsample: 'bicubic' is not one of nearest, bilinear, transposed"):
        DFCVAE(ModelConfig(upsample="bicubic"), 64)


def test_nearest_decoder_draws_no_checkerboard_at_init():
    """Untrained, the transposed decoder's samples already carry period-2 power; the nearest one's do not
    (as a share of the samples' variance: the scale of an untrained decoder's output is arbitrary).
    Both with the paper's head (no full-resolution stages, which the transposed decoder lacks)."""
    share = {}
    for upsample in ("transposed", "nearest"):
        torch.manual_seed(0)
        cfg = ModelConfig(hidden_channels=(16, 32, 64), latent_dim=8, upsample=upsample, full_res_convs=0)
        model = DFCVAE(cfg, 64).eval()
        samples = model.sample(8, torch.Generator().manual_seed(0))
        variance = ((samples + 1) / 2).double().var(dim=(2, 3)).mean(dim=1)  # (B,), the [0, 1] scale
        share[upsample] = float((nyquist_power(samples) / variance).mean())
    assert share["nearest"] < share["transposed"] / 10


def test_the_bilinear_decoder_prints_no_grid_at_init():
    """Untrained decoders' samples, phase maps at periods 4 and 8 (`metrics.phase_energy`): nearest
    upsampling's 2 x 2 blocks show (measured 1.17-1.37), bilinear's do not (1.06-1.15), with the
    paper's head; params.yaml's two full-resolution stages smooth both (1.08-1.14 and 1.03-1.09)."""
    peaks = {}
    for head in (0, 2):
        for upsample in ("nearest", "bilinear"):
            for seed in (0, 1):
                torch.manual_seed(seed)
                cfg = ModelConfig((16, 32, 64, 128), 32, upsample=upsample, init="dcgan", full_res_convs=head)
                samples = DFCVAE(cfg, 64).eval().sample(32, torch.Generator().manual_seed(0))
                peaks[head, upsample, seed] = [lattice_peak(phase_energy(samples, p)) for p in (4, 8)]
    for head in (0, 2):
        for seed in (0, 1):
            assert max(peaks[head, "bilinear", seed]) < 1.2, peaks
            assert all(b < n for b, n in zip(peaks[head, "bilinear", seed], peaks[head, "nearest", seed])), peaks


def test_full_res_convs_add_nonlinear_stages_at_full_resolution():
    """model.full_res_convs n: n 3x3 conv + BatchNorm + LeakyReLU stages at 64 px before the RGB conv;
    0 is the paper's head (the last upsampling maps straight to RGB); the transposed decoder refuses it."""
    x = torch.rand(2, 3, 64, 64) * 2 - 1
    sizes = {}  # conv -> its output's width
    for n, upsample in ((0, "bilinear"), (1, "bilinear"), (2, "bilinear"), (2, "nearest")):
        model = DFCVAE(ModelConfig(hidden_channels=(16, 32), latent_dim=8, upsample=upsample, full_res_convs=n), 64)
        model.eval()
        convs = []  # [conv, followed by a LeakyReLU], in order
        for m in model.decoder.modules():
            if isinstance(m, torch.nn.Conv2d):
                m.register_forward_hook(lambda conv, _, out: sizes.__setitem__(conv, out.shape[-1]))
                convs.append([m, False])
            elif isinstance(m, torch.nn.LeakyReLU):
                convs[-1][1] = True
        assert model(x)[0].shape == x.shape
        assert sum(sizes[conv] == 64 and nonlinear for conv, nonlinear in convs) == n
        assert sizes[convs[-1][0]] == 64 and not convs[-1][1]  # the RGB conv, then tanh
    with pytest.raises(ConfigError, match="model.full_res_convs is 1, but the transposed decoder has no such stages"):
        DFCVAE(ModelConfig(hidden_channels=(16, 32), latent_dim=8, upsample="transposed", full_res_convs=1), 64)
    with pytest.raises(ConfigError, match=r"model.full_res_convs is -1; set it to 0 or more\."):
        DFCVAE(ModelConfig(hidden_channels=(16, 32), latent_dim=8, full_res_convs=-1), 64)


def test_nyquist_power_is_the_power_of_period_2_patterns():
    flat = torch.zeros(2, 3, 16, 16)
    assert torch.equal(nyquist_power(flat), torch.zeros(2, dtype=torch.float64))
    i, j = torch.meshgrid(torch.arange(16), torch.arange(16), indexing="ij")
    for pattern in ((-1.0) ** (i + j), (-1.0) ** j, (-1.0) ** i):  # checkerboard, columns, rows
        a = 0.2  # amplitude on the [0, 1] scale
        x = (0.5 + a * pattern).expand(1, 3, 16, 16) * 2 - 1  # to [-1, 1]
        torch.testing.assert_close(nyquist_power(x), torch.tensor([a**2], dtype=torch.float64))
    smooth = torch.sin(i / 16 * 2 * torch.pi).float().expand(1, 3, 16, 16)  # one period: no Nyquist power
    assert float(nyquist_power(smooth)) < 1e-12
    with pytest.raises(ValueError, match="even H and W"):
        nyquist_power(torch.zeros(1, 3, 15, 16))


def test_active_units_follow_burda_et_al():
    mu = torch.zeros(100, 4)
    mu[:, 0] = torch.randn(100)  # variance ~1: active
    mu[:, 1] = 0.05 * torch.randn(100)  # variance ~0.0025: inactive
    mu[:, 2] = 3.0  # constant: inactive
    mu[:, 3] = 0.2 * torch.randn(100)  # variance ~0.04: active
    assert active_units(mu) == 2
    with pytest.raises(ValueError, match="N >= 2"):
        active_units(torch.zeros(1, 4))


def test_energy_and_unit_feature_terms_are_scale_free():
    torch.manual_seed(0)
    target = {"a": torch.rand(2, 8, 4, 4), "b": torch.rand(2, 16, 2, 2)}
    recon = {k: v + 0.1 * torch.randn_like(v) for k, v in target.items()}
    scaled = lambda d, c: {k: c * v for k, v in d.items()}  # noqa: E731
    for norm in ("energy", "unit"):
        base = feature_distances(target, recon, norm)
        for name, value in feature_distances(scaled(target, 57.0), scaled(recon, 57.0), norm).items():
            torch.testing.assert_close(value, base[name])
        assert all(float(v) == 0 for v in feature_distances(target, target, norm).values())
    none = feature_distances(target, recon)
    for name, value in feature_distances(scaled(target, 2.0), scaled(recon, 2.0)).items():
        torch.testing.assert_close(value, 4 * none[name])
    zero = {k: torch.zeros_like(v) for k, v in target.items()}
    assert all(abs(float(v) - 0.5) < 1e-6 for v in feature_distances(target, zero, "energy").values())
    with pytest.raises(ValueError, match="loss.feature_norm 'l1'"):
        feature_distances(target, recon, "l1")


def test_kl_warmup_ramps_alpha_linearly_then_holds():
    cfg = LossConfig(kl_warmup_steps=4)
    assert [kl_warmup(cfg, s) for s in (0, 1, 2, 4, 9)] == [0.0, 0.25, 0.5, 1.0, 1.0]
    assert kl_warmup(LossConfig(), 0) == 1.0
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    mu, logvar = torch.ones(2, 8), torch.zeros(2, 8)
    full, logs = dfc_vae_loss(x, x, mu, logvar, None, LossConfig(perceptual_weight=0.0))
    half, _ = dfc_vae_loss(x, x, mu, logvar, None, LossConfig(perceptual_weight=0.0), kl_scale=0.5)
    torch.testing.assert_close(half, 0.5 * full)


def test_the_lpips_term_alone_trains_the_vae_and_its_network_is_always_named():
    from dfcvae.device import Runtime
    from dfcvae.step import build_model, build_optimizer, make_train_step

    cfg = Config().with_overrides(
        {
            "model.hidden_channels": [8, 16],
            "model.latent_dim": 8,
            "data.image_size": 32,
            "loss.perceptual_weight": 0.0,
            "loss.pixel_weight": 0.0,
            "loss.lpips_weight": 1.0,
            "loss.lpips_weights": "random",
            "train.compile": False,
        }
    )
    runtime = Runtime(torch.device("cpu"))
    torch.manual_seed(0)
    model = build_model(cfg, runtime)
    optimizer, scheduler = build_optimizer(model, cfg, runtime)
    step = make_train_step(model, None, optimizer, scheduler, cfg, runtime)
    x = torch.rand(4, 3, 32, 32, generator=torch.Generator().manual_seed(1)) * 2 - 1
    before = copy.deepcopy(model.state_dict())
    distances = [float(step(x)["train/lpips"]) for _ in range(15)]
    assert distances[0] > 0 and distances[-1] < distances[0]  # the only term in the loss, and it falls
    assert any(not torch.equal(before[k], v) for k, v in model.state_dict().items())
    with pytest.raises(ConfigError, match="loss.lpips_net: '' is not one of alex, vgg"):
        cfg.with_overrides({"loss.lpips_net": ""})  # the loss's LPIPS always has its network


def test_the_lpips_network_of_the_loss_is_frozen():
    from dfcvae.device import Runtime
    from dfcvae.step import build_lpips

    cfg = Config().with_overrides({"loss.lpips_weight": 0.5, "loss.lpips_weights": "random"})
    network = build_lpips(cfg, Runtime(torch.device("cpu")))
    assert not network.training and not any(p.requires_grad for p in network.parameters())
    assert build_lpips(Config(), Runtime(torch.device("cpu"))) is None  # off by default


def test_the_shifted_feature_window_is_the_same_for_both_batches_and_moves_between_steps():
    x = torch.rand(2, 3, 16, 16)
    recon = x.flip(0)
    corners = set()
    for seed in range(40):
        torch.manual_seed(seed)
        a, b = shifted_crops(x, recon, 7)
        assert a.shape == b.shape == (2, 3, 9, 9)
        # The same window of each: find it in x and check recon's is the same place.
        found = [(i, j) for i in range(8) for j in range(8) if torch.equal(x[..., i : i + 9, j : j + 9], a)]
        assert len(found) == 1 and torch.equal(
            recon[..., found[0][0] : found[0][0] + 9, found[0][1] : found[0][1] + 9], b
        )
        corners.add(found[0])
    assert len(corners) > 20  # the grid moves from step to step
    torch.manual_seed(3)
    first = shifted_crops(x, recon, 7)[0]
    torch.manual_seed(3)
    assert torch.equal(first, shifted_crops(x, recon, 7)[0])  # seeded per step: a resumed run repeats it


def test_the_feature_shift_applies_to_training_only():
    from dfcvae.config import LossConfig

    perceptual = PerceptualNetwork("mobilenet_v2", ["vae123"], "random")
    x, recon = torch.rand(2, 3, 32, 32) * 2 - 1, torch.rand(2, 3, 32, 32) * 2 - 1
    mu, logvar = torch.zeros(2, 4), torch.zeros(2, 4)
    plain, shifted = LossConfig(), LossConfig(feature_shift=7)
    val = [dfc_vae_loss(x, recon, mu, logvar, perceptual, c, split="val")[0] for c in (plain, shifted)]
    assert torch.equal(val[0], val[1])
    torch.manual_seed(0)
    train = dfc_vae_loss(x, recon, mu, logvar, perceptual, shifted)[0]
    assert not torch.equal(train, dfc_vae_loss(x, recon, mu, logvar, perceptual, plain)[0])


def test_a_feature_shift_that_leaves_no_window_fails_in_the_driver():
    from dfcvae.step import check_config

    cfg = Config()
    check_config(cfg.with_overrides({"loss.feature_shift": 7}))
    for shift in (-1, cfg.data.image_size):
        with pytest.raises(ConfigError, match=f"loss.feature_shift is {shift}; it must be 0 \\(off\\) to 32 px"):
            check_config(cfg.with_overrides({"loss.feature_shift": shift}))


def phase_sensitivity(net: PerceptualNetwork, period: int) -> Tensor:
    """The feature loss of the same noise drawn at one pixel phase (y mod period, x mod period) of
    smooth images cropped at random offsets, per phase: (period, period)."""
    torch.manual_seed(0)
    smooth = torch.nn.functional.interpolate(torch.rand(16, 3, 24, 24), size=96, mode="bicubic").clamp(0, 1) * 2 - 1
    x = torch.stack([smooth[i, :, o : o + 64, o : o + 64] for i, o in enumerate(torch.randint(0, 32, (16,)).tolist())])
    noise, losses = 0.2 * torch.randn_like(x), torch.zeros(period, period)
    with torch.no_grad():
        for a in range(period):
            for b in range(period):
                mask = torch.zeros(1, 1, 64, 64)
                mask[..., a::period, b::period] = 1
                losses[a, b] = sum(perceptual_term(net, x, x + noise * mask, "energy").values())
    return losses


@pytest.mark.slow
def test_the_antialiased_network_prices_an_error_alike_at_every_pixel_phase(mobilenet):
    # Strided features see an error at some phases of their grid more than at others, so a VAE trained
    # to match them puts its error where it is cheap: a lattice. Blur before subsampling evens that out.
    antialiased = PerceptualNetwork("mobilenet_v2", ["vae123"], "imagenet", antialias=True)
    plain, blurred = phase_sensitivity(mobilenet, 8), phase_sensitivity(antialiased, 8)
    assert plain.max() / plain.min() > 1.7  # measured 1.86
    assert blurred.max() / blurred.min() < 1.45  # measured 1.36


@pytest.mark.parametrize("backbone, layers", [("mobilenet_v2", ["vae123"]), ("vgg19_bn", ["vae345"])])
def test_antialiasing_keeps_each_layer_shape_and_weights(backbone, layers):
    torch.manual_seed(0)
    plain = PerceptualNetwork(backbone, layers, "random")
    torch.manual_seed(0)
    antialiased = PerceptualNetwork(backbone, layers, "random", antialias=True)
    x = torch.rand(2, 3, 64, 64) * 2 - 1
    assert {k: v.shape for k, v in plain(x).items()} == {k: v.shape for k, v in antialiased(x).items()}
    assert sorted(p.sum().item() for p in plain.parameters()) == sorted(
        p.sum().item() for p in antialiased.parameters()
    )
    subsamplings = sum(
        isinstance(m, torch.nn.MaxPool2d) or (isinstance(m, torch.nn.Conv2d) and max(m.stride) > 1)
        for m in plain.modules()
    )
    assert (
        sum(isinstance(m, Blur) for m in antialiased.modules())
        == subsamplings
        == (3 if backbone == "mobilenet_v2" else 4)
    )
    # A constant image passes each blur unchanged: the low-pass keeps the mean and the borders.
    flat = torch.full((1, 5, 9, 9), 0.3)
    torch.testing.assert_close(Blur()(flat), flat)
    torch.testing.assert_close(Blur(stride=2)(flat), torch.full((1, 5, 5, 5), 0.3))


def test_the_code_digest_that_names_runs_covers_the_subpackages(tmp_path, monkeypatch):
    """A run's name and a search's identity hash the package's code: a change to the shard
    loader, in dfcvae/shards/, must change it as a change to dfcvae/model.py does."""
    import shutil

    from dfcvae import tracking

    package = tmp_path / "dfcvae"
    shutil.copytree(ROOT / "dfcvae", package, ignore=shutil.ignore_patterns("__pycache__"))
    monkeypatch.setattr(tracking, "__file__", str(package / "tracking.py"))
    before = tracking.code_digest()
    for changed in ("shards/loader.py", "model.py"):
        path = package / changed
        original = path.read_text()
        path.write_text(original + "\n# changed\n")
        assert tracking.code_digest() != before, changed
        path.write_text(original)
    assert tracking.code_digest() == before


def test_every_closed_choice_is_one_literal_that_its_implementation_covers_exactly():
    """A value is checked once, where the config is read; each table that implements the choice
    has exactly the Literal's values, so a value the config accepts always has an implementation."""
    import typing

    from dfcvae import config
    from dfcvae.fetch import SOURCES
    from dfcvae.lpips_metric import NETS
    from dfcvae.shards.format import IMAGE_MEMBERS
    from dfcvae.step import COMPILE_MODES, SCHEDULES
    from dfcvae.uncertainty import OBJECTIVES

    tables = {
        config.Source: SOURCES,
        config.Encoding: IMAGE_MEMBERS,
        config.Schedule: SCHEDULES,
        config.CompileMode: COMPILE_MODES,
        config.Objective: OBJECTIVES,
        config.LpipsNet: NETS,
    }
    for choice, table in tables.items():
        assert set(typing.get_args(choice)) == set(table), choice
    cfg = Config()
    for key, bad in (("model.upsample", "bicubic"), ("tune.search_alg", "bayes"), ("model.encoder_kernel", 5)):
        with pytest.raises(ConfigError, match=rf"{key}: {bad!r} is not one of .*; pick one\."):
            cfg.with_overrides({key: bad})
    assert cfg.with_overrides({"model.encoder_kernel": 3.0}).model.encoder_kernel == 3  # as YAML may write it


@pytest.mark.parametrize(("backbone", "strides"), [("vgg19_bn", [1, 2, 4, 8]), ("mobilenet_v2", [2, 4, 8, 16])])
def test_the_vae1234_preset_is_vae123_and_the_next_stage_at_twice_the_stride(backbone, strides):
    deep, shallow = resolve_layers(backbone, ["vae1234"]), resolve_layers(backbone, ["vae123"])
    assert deep[:3] == shallow and list(layer_strides(backbone, ("vae1234",)).values()) == strides
