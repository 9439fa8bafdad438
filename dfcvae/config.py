"""Typed, frozen configuration: params.yaml is the single source of truth.

`Config.load()` reads params.yaml into one frozen dataclass per section. A key
that is not a field (a typo) or a value of the wrong type is an error naming
the section and the key, so bad config fails before any work starts. Derived
values are properties and are never written back. `to_dict()`/`from_dict()`
round-trip through plain data, which is how config crosses the Ray boundary
and reaches MLflow (`flat()`); `with_overrides()` applies dotted-key overrides
(Ray Tune trials, the best trial's result) through the same validation.

The dataclass defaults are the one place values are written: params.yaml's
values are written from them (`render_params`, `make params`), its comments
kept, and tests/test_core.py checks that it is, so `Config()` in a benchmark or
a test is the real job, never a third configuration. A config stored with a
model is read by `from_stored()`, which gives keys added since it was written
their old meaning (STORED_BEFORE_FIELD).
docs/config.md says how to add a key."""

from __future__ import annotations

import dataclasses
import functools
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from ruamel.yaml import YAML, YAMLError


class UserError(Exception):
    """A mistake in what the user gave (params, data, a model to register), in one sentence that
    says what is wrong and what to do. The commands print it without a traceback."""


class ConfigError(UserError, ValueError):
    """A params.yaml problem, phrased so the user knows what to edit."""


def load_yaml(text: str) -> Any:
    """YAML 1.2 text -> plain data, read by ruamel.yaml, the library DVC writes params.yaml with
    (`dvc exp run -S` writes `kl_weight: 1e-05`): `1e-5` is a number and `yes` a string, where
    YAML 1.1 (PyYAML) reads a string and a boolean. ConfigError for text that is not YAML, or
    that gives one key twice."""
    try:
        return YAML(typ="safe", pure=True).load(text)
    except YAMLError as err:
        raise yaml_error(err) from None


def yaml_error(err: YAMLError) -> ConfigError:
    """ruamel.yaml's error as one sentence: where, what, and to fix it there."""
    mark = getattr(err, "problem_mark", None)
    where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
    return ConfigError(f"not valid YAML{where} ({getattr(err, 'problem', None) or err}); fix it there.")


# The released DFC-VAE's network and optimiser (houxianxu/DFC-VAE, CVAE.lua and main_cvae.lua) as
# dotted overrides: nearest-neighbour x2 upsampling + replication padding + 3x3 conv in the
# decoder, 4x4 stride-2 convs in the encoder, DCGAN init, latent 100, Adam lr 5e-4, beta1 0.5.
PAPER_NETWORK: dict[str, Any] = {
    "model.upsample": "nearest",
    "model.encoder_kernel": 4,
    "model.init": "dcgan",
    "model.full_res_convs": 0,  # the last upsampling maps straight to RGB
    "model.latent_dim": 100,
    "optim.lr": 5e-4,
    "optim.betas": [0.5, 0.999],
}


# The search around the measured balance (docs/quality.md): alpha by 10x each way.
SEARCH_SPACE: dict[str, Any] = {
    "loss.kl_weight": {"loguniform": [0.0003, 0.03]},
    "loss.perceptual_weight": {"loguniform": [0.1, 10.0]},
    "loss.pixel_weight": {"choice": [0.0, 0.3, 1.0, 3.0]},
    "perceptual.layers": {"choice": ["vae123", "vae1234", "vae345"]},
}

# What a stored config (a model.pt, a registered model) written before a key existed meant by its
# absence: the behaviour of the code of that time. `Config.from_stored` fills these in, so an old
# model loads as the network it is; any other missing key takes today's default.
# Keys that params.yaml no longer has -> why, and what to do (a stored config just drops them).
REMOVED_KEYS: dict[str, str] = {
    "data.raw_dir": (
        "fetch writes an inventory to data.inventory_dir now, not a copy of the images: remove "
        "data.raw_dir from params.yaml (and delete the old copy, data/raw), then run `dvc repro`"
    ),
}

STORED_BEFORE_FIELD: dict[str, Any] = {
    "model.upsample": "transposed",
    "model.encoder_kernel": 3,
    "model.init": "default",
    "loss.feature_norm": "none",
    "optim.betas": [0.9, 0.999],
    "perceptual.antialias": False,
    "loss.feature_shift": 0,
    "model.full_res_convs": 0,
    "train.ema_decay": 0.0,
}


# Closed choices: each is one Literal, checked once, where the config is read (_coerce). The code
# that implements a choice keeps a table of it (FEATURE_NORMS and SAMPLERS take theirs from
# typing.get_args), and tests/test_core.py checks that every table covers exactly these values.
Source = Literal["celeba", "synthetic", "folder"]
ShardEngine = Literal["auto", "local", "ray"]
Encoding = Literal["raw", "png"]
Upsample = Literal["nearest", "bilinear", "transposed"]
EncoderKernel = Literal[3, 4]  # stride 2, padding 1: both halve an even size exactly
Init = Literal["default", "dcgan"]
FeatureNorm = Literal["none", "energy", "unit"]
Schedule = Literal["constant", "exponential", "cosine"]
CompileMode = Literal["default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs"]
SearchAlg = Literal["random", "grid"]
Objective = Literal["fid_samples", "fid_recon", "fid_sum"]
SamplerName = Literal["normal", "gmm"]
FidProtocol = Literal["fast", "literature"]
LpipsNet = Literal["alex", "vgg"]


class Section:
    """A params.yaml section: its closed choices (Literal fields) are checked however it is built,
    from params.yaml or as a dataclass in code, by the one check that reading params.yaml uses."""

    def __post_init__(self) -> None:
        for name, hint in _literal_fields(type(self)).items():
            _coerce(getattr(self, name), hint, f"{_section_name(type(self))}.{name}")


@functools.cache
def _literal_fields(cls: type) -> dict[str, Any]:
    return {name: hint for name, hint in typing.get_type_hints(cls).items() if typing.get_origin(hint) is Literal}


@functools.cache
def _section_name(cls: type) -> str:
    return next(name for name, hint in typing.get_type_hints(Config).items() if hint is cls)


@dataclass(frozen=True)
class DataConfig(Section):
    source: Source = "celeba"
    celeba_dir: str = "data/celeba"  # where CelebA is looked for (folder, zip, txt or csv)
    folder_dir: str = ""  # source=folder: the user's image tree
    download: bool = True  # source=celeba: try torchvision's downloader when missing
    inventory_dir: str = "data/inventory"  # fetch output: an inventory of the source's images, not a copy
    shards_dir: str = "data/shards"  # shard output: <split>-NNNNNN.tar + manifest.json
    synthetic_count: int = 2000
    split_fractions: tuple[float, float, float] = (0.8, 0.1, 0.1)  # train/val/test
    seed: int = 0
    # Centre crop before resizing: pixels (148 is PyTorch-VAE's for CelebA's aligned 178x218 faces),
    # "square" (the centre square of each image's shorter side), or "auto": square for a folder, else 148.
    crop_size: int | str = "auto"
    image_size: int = 64
    encoding: Encoding = "raw"
    samples_per_shard: int = 2000
    max_reject_fraction: float = 0.01  # shard fails if more raw images are unusable
    max_image_pixels: int = 50_000_000  # larger raw images are rejected (decompression bombs)
    celeba_counts: tuple[int, int, int] = (162770, 19867, 19962)  # train/val/test images fetch expects

    @property
    def manifest_path(self) -> Path:
        return Path(self.shards_dir) / "manifest.json"


@dataclass(frozen=True)
class ShardConfig(Section):
    # Where the shard stage runs: "local" (worker processes here), "ray" (Ray tasks on the cluster
    # at RAY_ADDRESS, or a local one), or "auto": ray when RAY_ADDRESS is set, else local.
    engine: ShardEngine = "auto"
    workers: int = 0  # shards written at once; 0 = the cores here (local) or the cluster's CPUs (ray)
    max_retries: int = 3  # ray: times a task whose process or node died is run again


@dataclass(frozen=True)
class LoaderConfig(Section):
    batch_size: int = 256  # per worker; global batch = batch_size * scaling.num_workers
    num_workers: int = 4  # DataLoader processes per training worker
    shuffle_buffer: int = 5000
    corrupt_tolerance: int = 0  # samples that may be skipped from corrupt shards; 0 = fail
    shard_url: str = ""  # e.g. "pipe:aws s3 cp s3://bucket/shards/{name} -"; "" = data.shards_dir/{name}
    # Check each shard against the manifest's sha256 at a process's first read of it, before any
    # of its samples is used. Costs one extra pass over each shard per process (docs/data.md).
    verify_shards: bool = True


@dataclass(frozen=True)
class ModelConfig(Section):
    hidden_channels: tuple[int, ...] = (32, 64, 128, 256, 512)
    latent_dim: int = 128
    # The paper's network (PAPER_NETWORK) but for bilinear upsampling, which with loss.feature_shift
    # keeps the DFC-VAE's reconstructions free of a lattice (docs/quality.md); a stored config
    # without these keys is the older transposed one (STORED_BEFORE_FIELD).
    upsample: Upsample = "bilinear"  # decoder: nearest | bilinear (x2 resize, replication pad, 3x3 conv) | transposed
    encoder_kernel: EncoderKernel = 4  # the encoder's stride-2 convs (4 as the paper's code)
    init: Init = "dcgan"  # default (PyTorch's) | dcgan (conv N(0, 0.02), BatchNorm N(1, 0.02))
    # Stages of 3x3 conv, BatchNorm, LeakyReLU at full resolution before the RGB conv (nearest and
    # bilinear decoders); 0 = the paper's, whose last upsampling maps straight to RGB (dfcvae/model.py).
    # 2: a bilinear decoder can then draw the top octave without a lattice (docs/quality.md).
    full_res_convs: int = 2


@dataclass(frozen=True)
class PerceptualConfig(Section):
    backbone: str = "vgg19_bn"  # vgg19_bn | vgg19 | vgg16 | mobilenet_v2
    # Layer names, or one preset: vae123 | vae1234 | vae345 (dfcvae/features.py). vae1234 with unit
    # features: the lead on FID without a lattice (docs/quality.md).
    layers: tuple[str, ...] = ("vae1234",)
    weights: str = "imagenet"  # imagenet | random | path to a state_dict file
    # Blur before each subsampling of the network, same weights (Zhang 2019; dfcvae/features.py):
    # against the lattice that matching strided features rewards (docs/quality.md).
    antialias: bool = False


@dataclass(frozen=True)
class LossConfig(Section):
    kl_weight: float = 0.003  # alpha (Hou et al. 2017, eq. 4)
    perceptual_weight: float = 1.0  # beta
    pixel_weight: float = 1.0  # pixel MSE beside the features; 0 as in the paper
    # none: the paper's 1/(2 C H W) ||.||^2 per layer; energy: that divided by the layer's mean
    # squared target feature on the batch; unit: channel vectors scaled to unit length first (LPIPS).
    feature_norm: FeatureNorm = "unit"
    kl_warmup_steps: int = 0  # alpha rises linearly from 0 over these steps; 0 = off
    lpips_weight: float = 0.0  # LPIPS(x, x_hat) in the loss, with this network and these weights; 0 = off
    lpips_net: LpipsNet = "alex"
    lpips_weights: str = "imagenet"  # imagenet | random | a file (dfcvae/lpips_metric.py)
    # Training's feature term on the same random window of x and x_hat, this many px smaller, at an
    # offset in [0, feature_shift] (dfcvae/loss.py): against the lattice of strided features; 0 = off.
    # 15 covers every phase of a stride-16 layer (MobileNetV2's block13), and of a stride-8 one twice.
    feature_shift: int = 15


@dataclass(frozen=True)
class OptimConfig(Section):
    lr: float = 1e-3  # for the global batch
    weight_decay: float = 0.0
    schedule: Schedule = "exponential"
    min_lr_fraction: float = 0.1  # lr at the last step, as a fraction of lr
    grad_clip: float = 0.0  # max grad norm; 0 disables clipping
    betas: tuple[float, float] = (0.5, 0.999)  # Adam's; the paper's code uses (0.5, 0.999)


@dataclass(frozen=True)
class TrainConfig(Section):
    steps: int = 20000
    seed: int = 0
    log_every: int = 50
    val_every: int = 1000
    val_batches: int = 8
    checkpoint_every: int = 1000
    keep_checkpoints: int = 3
    grid_every: int = 2000
    compile: bool = True  # torch.compile on GPU
    compile_mode: CompileMode = "default"  # torch.compile mode; reduce-overhead adds CUDA graphs
    out_dir: str = "outputs/train"
    # A training checkpoint to resume, or a model (model.pt, a models:/ URI) whose weights start a run at step 0.
    init_from: str = ""
    # Warn once when fewer latent dimensions than this fraction are active (Burda et al. 2016)
    # at a validation after the KL warm-up: the posterior is collapsing.
    warn_active_fraction: float = 0.1
    # Exponential moving average of the VAE's weights and BatchNorm statistics, 0 = off; its decay
    # warms up to this over about 900 updates (dfcvae/step.py, ema_with_warmup). When on, validation,
    # the tuning objective, the grids, model.pt and so the registered model are the EMA's.
    ema_decay: float = 0.99
    # Seconds between MLflow system metrics (CPU, memory, disk, network; GPU through nvidia-ml-py),
    # sampled on rank 0's node and logged to the run as system/*; 0 = off.
    system_metrics_s: float = 10.0


@dataclass(frozen=True)
class ScalingConfig(Section):
    num_workers: int = 4
    use_gpu: bool = True
    cpus_per_worker: float = 8.0
    gpus_per_worker: float = 1.0
    max_failures: int = 2
    # Checkpoints: a local path on one machine; on a cluster of several nodes an s3:// (any
    # pyarrow) URI, or a path every node mounts (then storage_shared: true). A checkpoint on one
    # node's disk does not survive that node, so a local path on several nodes is refused.
    storage_dir: str = "outputs/ray"
    storage_shared: bool = False
    placement_strategy: str = "PACK"  # Ray's: PACK (fewest nodes) | SPREAD (across nodes) | STRICT_*
    worker_resources: dict[str, float] = field(default_factory=dict)  # custom Ray resources per worker
    # How long a run (or its restart after a lost node) waits for nodes for all its workers
    # before it fails saying so; an autoscaler's new node usually takes minutes.
    node_wait_s: float = 600.0
    # The network interface of the ranks' gloo and NCCL sockets (GLOO_SOCKET_IFNAME and
    # NCCL_SOCKET_IFNAME); "": those variables where set, else the interface that holds the node's
    # Ray address (lo on one machine). The rendezvous store listens on that address only.
    socket_ifname: str = ""


@dataclass(frozen=True)
class TuneConfig(Section):
    enabled: bool = True
    num_samples: int = 24
    max_concurrent: int = 4
    search_alg: SearchAlg = "random"
    steps: int = 3000  # training steps per trial
    grace_period: int = 1000  # ASHA: steps before a trial can be stopped
    reduction_factor: int = 3
    report_every: int = 500  # steps between objective evaluations in a trial
    driver_cpus: float = 0.25  # per-trial driver; fractional so trials never deadlock
    space: dict[str, Any] = field(default_factory=lambda: dict(SEARCH_SPACE))  # dotted key -> distribution
    out_dir: str = "outputs/tune"

    @property
    def best_overrides_path(self) -> Path:
        return Path(self.out_dir) / "best_overrides.json"


@dataclass(frozen=True)
class EvalConfig(Section):
    num_samples: int = 10000  # prior samples and test images for FID
    val_subset: int = 1024  # fixed val images for the cheap tuning objective
    batch_size: int = 256
    objective: Objective = "fid_sum"  # lower is better
    reference_backbone: str = "vgg19_bn"  # fixed perceptual distance, the same for all models
    reference_layers: tuple[str, ...] = ("vae345",)
    reference_weights: str = "imagenet"
    probe_attributes: tuple[str, ...] = (
        "Smiling",
        "Eyeglasses",
        "Male",
        "Bangs",
        "Wearing_Hat",
        "Blond_Hair",
        "Black_Hair",
        "Young",
    )
    arithmetic_attributes: tuple[str, ...] = ("Smiling", "Eyeglasses")
    probe_train_samples: int = 20000  # train images whose latent means fit the attribute probe
    seed: int = 0  # prior samples for FID and the sample grid
    # Prior samples (dfcvae/sampler.py): normal, z ~ N(0, temperature^2 I), or gmm, a Gaussian
    # mixture fit on train latent means. Every sampler's FID is reported (test/fid_samples_<name>);
    # this one's is test/fid_samples, draws samples.png, and goes with the registered model.
    sampler: SamplerName = "gmm"  # measured: FID 155 against N(0, I)'s 226 on the demo (docs/quality.md)
    temperature: float = 1.0
    gmm_components: int = 10
    # LPIPS of reconstructions (dfcvae/lpips_metric.py): net alex | vgg; weights
    # imagenet (test/lpips, comparable with published numbers) | random | a file (test/lpips_random, test/lpips_file).
    lpips_net: LpipsNet = "alex"
    lpips_weights: str = "imagenet"
    # Uncertainty (dfcvae/uncertainty.py): two-sided percentile bootstrap intervals at `confidence`
    # over `bootstrap_resamples` resamples of the test images and samples (test/<metric>_ci); each
    # FID resample at 10,000 images (more images than Inception features) costs about 7 CPU-seconds,
    # at 120 images about 20 ms (docs/quality.md, Uncertainty).
    confidence: float = 0.95
    bootstrap_resamples: int = 50
    # KID (Bińkowski et al. 2018): its spread over this many random subsets of up to this many images.
    kid_subsets: int = 100
    kid_subset_size: int = 1000
    # fast: the FIDs above. literature: also the FIDs of a published CelebA-64 protocol (Ghosh et
    # al. 2020; evaluate.LITERATURE): the first 10,000 test images, 10,000 samples and
    # reconstructions, test/fid_{samples,recon}_literature (docs/quality.md, which numbers they meet).
    fid_protocol: FidProtocol = "fast"
    out_dir: str = "outputs/eval"


@dataclass(frozen=True)
class ServeConfig(Section):
    # The most images one request may send or ask for (params.n): a reply of 64 images of 64 px
    # is ~15 MB of JSON. Read when the model is registered, and served with it.
    max_batch: int = 64


@dataclass(frozen=True)
class RegistryConfig(Section):
    model_name: str = "dfcvae"
    out_dir: str = "outputs/register"
    # Serialises the champion decision across processes. A SQLite store uses `<db>.registry.lock`
    # beside the database instead; for a shared tracking server, put this on a shared filesystem.
    lock_file: str = "outputs/mlflow/registry.lock"
    lock_timeout_s: float = 600.0
    # A model with fewer active latent dimensions (fraction, test/active_fraction) never becomes
    # champion: its posterior collapsed, whatever its FID.
    min_active_fraction: float = 0.1
    # The champion gate (dfcvae/registry.py): a challenger is promoted only when its eval.objective is
    # lower than the champion's by at least min_improvement (a fraction of the champion's) with
    # probability min_confidence, over paired bootstrap resamples of the same test images and samples.
    min_confidence: float = 0.95
    min_improvement: float = 0.15


@dataclass(frozen=True)
class MlflowConfig(Section):
    experiment: str = "dfcvae"
    # Used when MLFLOW_TRACKING_URI is unset: a local SQLite store and artifact folder.
    local_db: str = "outputs/mlflow/mlflow.db"
    local_artifacts: str = "outputs/mlflow/artifacts"


@dataclass(frozen=True)
class Config:
    data: DataConfig = field(default_factory=DataConfig)
    shard: ShardConfig = field(default_factory=ShardConfig)
    loader: LoaderConfig = field(default_factory=LoaderConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    perceptual: PerceptualConfig = field(default_factory=PerceptualConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    scaling: ScalingConfig = field(default_factory=ScalingConfig)
    tune: TuneConfig = field(default_factory=TuneConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    registry: RegistryConfig = field(default_factory=RegistryConfig)
    serve: ServeConfig = field(default_factory=ServeConfig)
    mlflow: MlflowConfig = field(default_factory=MlflowConfig)

    @property
    def global_batch_size(self) -> int:
        return self.loader.batch_size * self.scaling.num_workers

    @classmethod
    def load(cls, path: str | Path = "params.yaml") -> Config:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"{path} not found: run from the project root or pass the params file path.")
        try:
            raw = load_yaml(path.read_text()) or {}
        except ConfigError as err:
            raise ConfigError(f"{path}: {err}") from None
        return cls.from_dict(raw, source=str(path))

    @classmethod
    def from_dict(cls, raw: dict[str, Any], source: str = "config") -> Config:
        return _build(cls, raw, f"{source}")

    @classmethod
    def from_stored(cls, raw: dict[str, Any], source: str = "stored config") -> Config:
        """A config saved with a model (checkpoint.py, the registry): keys it lacks take the value
        they had when it was written (STORED_BEFORE_FIELD), then today's defaults."""
        raw = {section: dict(values) if isinstance(values, dict) else values for section, values in raw.items()}
        for dotted, value in STORED_BEFORE_FIELD.items():
            section, key = dotted.split(".")
            if isinstance(raw.get(section), dict):
                raw[section].setdefault(key, value)
        for dotted in REMOVED_KEYS:
            section, key = dotted.split(".")
            if isinstance(raw.get(section), dict):
                raw[section].pop(key, None)
        return cls.from_dict(raw, source=source)

    def to_dict(self) -> dict[str, Any]:
        return _plain(dataclasses.asdict(self))

    def identity(self) -> dict[str, Any]:
        """to_dict() without LOCATION_KEYS and the tracking and serving sections: what a result depends on.
        Resumable things (a training run, a search) are named by a digest of this, the data's
        manifest hash and the code's digest, so a moved checkout or a DVC temp workspace resumes
        them, and new data, code or settings never do."""
        raw = self.to_dict()
        for dotted in LOCATION_KEYS:
            section, key = dotted.split(".")
            raw[section].pop(key)
        return {section: values for section, values in raw.items() if section not in ("mlflow", "registry", "serve")}

    def flat(self) -> dict[str, Any]:
        """Dotted keys -> scalar values (lists joined), e.g. for MLflow params."""
        out: dict[str, Any] = {}
        for section, values in self.to_dict().items():
            for key, value in values.items():
                if isinstance(value, dict):
                    for sub, v in value.items():
                        out[f"{section}.{key}.{sub}"] = v
                else:
                    out[f"{section}.{key}"] = ",".join(map(str, value)) if isinstance(value, list) else value
        return out

    def with_overrides(self, overrides: dict[str, Any]) -> Config:
        """A copy with dotted keys ("loss.kl_weight") replaced, validated like params.yaml."""
        raw = self.to_dict()
        for dotted, value in overrides.items():
            section, _, key = dotted.partition(".")
            if section not in raw or not key:
                raise ConfigError(f"override '{dotted}': expected 'section.key' with a section from {sorted(raw)}.")
            raw[section][key] = value
        return Config.from_dict(raw, source="overrides")


# Where things are, not what they are. The data itself enters identities by its manifest hash.
LOCATION_KEYS = (
    "data.celeba_dir",
    "data.folder_dir",
    "data.inventory_dir",
    "data.shards_dir",
    "loader.shard_url",
    "train.out_dir",
    "scaling.storage_dir",
    "tune.out_dir",
    "eval.out_dir",
)


def _number(value: Any) -> int | float | None:
    """An int or float as written: a YAML number, or a string holding one (a quoted "1e-3");
    None for anything else (booleans are not numbers here)."""
    if isinstance(value, bool):
        return None
    if isinstance(value, (int, float)):
        return value
    if isinstance(value, str):
        parsed = load_yaml(value.strip()) if value.strip() else None
        if isinstance(parsed, (int, float)) and not isinstance(parsed, bool):
            return parsed
    return None


def _plain(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def _build(cls: type, raw: Any, where: str, section: str = "") -> Any:
    if not isinstance(raw, dict):
        raise ConfigError(f"{where}: expected a mapping, got {type(raw).__name__}.")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    unknown = sorted(set(raw) - set(names))
    removed = next((REMOVED_KEYS[f"{section}.{k}"] for k in unknown if f"{section}.{k}" in REMOVED_KEYS), None)
    if removed:
        raise ConfigError(f"{where}: {removed}.")
    if unknown:
        what = f"key '{unknown[0]}' in section '{section}'" if section else f"section '{unknown[0]}'"
        raise ConfigError(f"{where}: unknown {what}; valid names are: {', '.join(names)}.")
    kwargs = {}
    for name in names:
        if name not in raw:
            continue
        hint = hints[name]
        if dataclasses.is_dataclass(hint):
            kwargs[name] = _build(hint, raw[name] if raw[name] is not None else {}, where, section=name)
        else:
            kwargs[name] = _coerce(raw[name], hint, f"{where}: {section}.{name}" if section else f"{where}: {name}")
    return cls(**kwargs)


def _coerce(value: Any, hint: Any, where: str) -> Any:
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if origin is Literal:  # a closed choice
        for option in args:
            if value == option and (
                type(value) is type(option) or _number(value) is not None and _number(option) is not None
            ):
                return option
        raise ConfigError(f"{where}: {value!r} is not one of {', '.join(map(str, args))}; pick one.")
    if origin in (typing.Union, types.UnionType):
        for option in args:
            try:
                return _coerce(value, option, where)
            except ConfigError:
                continue
        raise ConfigError(f"{where}: {value!r} is not any of {hint}.")
    if origin is tuple:
        if isinstance(value, str):  # `layers: vae123` is shorthand for `[vae123]`
            value = [value]
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: expected a list, got {value!r}.")
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_coerce(v, args[0], f"{where}[{i}]") for i, v in enumerate(value))
        if len(value) != len(args):
            raise ConfigError(f"{where}: expected {len(args)} values, got {len(value)}.")
        return tuple(_coerce(v, a, f"{where}[{i}]") for i, (v, a) in enumerate(zip(value, args)))
    if origin is dict or hint is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping, got {value!r}.")
        return dict(value)
    if hint is Any:
        return value
    if hint is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{where}: expected true or false, got {value!r}.")
        return value
    if hint is int:
        number = _number(value)
        if number is None or not math.isfinite(number) or number != int(number):
            raise ConfigError(f"{where}: expected an integer, got {value!r}.")
        return int(number)  # 1e3 and "20000" are integers as people write them
    if hint is float:
        number = _number(value)
        if number is None:
            raise ConfigError(f"{where}: expected a number, got {value!r}.")
        return float(number)
    if hint is str:
        if not isinstance(value, str):
            raise ConfigError(f"{where}: expected a string, got {value!r}.")
        return value
    raise ConfigError(f"{where}: unsupported type {hint}.")


# ---------------------------------------------------------------- params.yaml, written from the defaults


def render_params(text: str, cfg: Config | None = None) -> str:
    """params.yaml text with `cfg`'s values (default: the dataclass defaults, the one place values
    are written) and its comments, key order and formatting kept where a value did not change: a
    changed value is replaced, a field missing from the text is added after the field before it,
    and a key or section no dataclass has is removed. Rendering the committed params.yaml returns
    it unchanged (tests/test_core.py). ConfigError for text that is not YAML."""
    import io

    from ruamel.yaml import YAML as RoundTrip
    from ruamel.yaml.comments import CommentedMap, CommentedSeq
    from ruamel.yaml.scalarstring import DoubleQuotedScalarString

    def as_yaml(value: Any, nested: bool = False) -> Any:
        if isinstance(value, list):
            seq = CommentedSeq(as_yaml(v, True) for v in value)
            seq.fa.set_flow_style()
            return seq
        if isinstance(value, dict):
            mapping = CommentedMap((k, as_yaml(v, True)) for k, v in value.items())
            if nested or not value:
                mapping.fa.set_flow_style()
            return mapping
        return DoubleQuotedScalarString(value) if value == "" else value

    yaml = RoundTrip()
    yaml.width = 4096  # never wrap a long comment or value
    yaml.preserve_quotes = True
    try:
        doc = yaml.load(text) or CommentedMap()
    except YAMLError as err:
        raise yaml_error(err) from None
    cfg = cfg or Config()
    wanted = cfg.to_dict()
    for section in [s for s in doc if s not in wanted]:
        del doc[section]
    for index, (section, values) in enumerate(wanted.items()):
        if not isinstance(doc.get(section), dict):
            doc.insert(index, section, CommentedMap())
        mapping, typed = doc[section], getattr(cfg, section)
        hints = typing.get_type_hints(type(typed))
        for key in [k for k in mapping if k not in values]:
            del mapping[key]
        for position, (key, value) in enumerate(values.items()):
            if key not in mapping:
                mapping.insert(position, key, as_yaml(value))
                if position == len(mapping) - 1 and position > 0:
                    _move_trailing_lines(mapping, list(mapping)[position - 1], key)
            elif not _holds(mapping[key], hints[key], getattr(typed, key)):
                mapping[key] = as_yaml(value)
    out = io.StringIO()
    yaml.dump(doc, out)
    return out.getvalue()


def _move_trailing_lines(mapping: Any, previous: str, key: str) -> None:
    """A key appended to a section goes before the blank line and comments that close the section,
    which ruamel.yaml keeps with the previous last key."""
    from ruamel.yaml.tokens import CommentToken

    comments = mapping.ca.items.get(previous)
    token = comments[2] if comments else None
    if token is None or "\n" not in token.value:
        return
    line, rest = token.value.split("\n", 1)
    comments[2] = CommentToken(line + "\n", token.start_mark, None) if line.strip() else None
    mapping.ca.items[key] = [None, None, CommentToken("\n" + rest, token.start_mark, None), None]


def _holds(written: Any, hint: Any, value: Any) -> bool:
    """Whether `written` (as params.yaml gives it) reads as `value` (`vae123` as ("vae123",), 600 as 600.0)."""
    try:
        return _coerce(_plain(written), hint, "") == value
    except ConfigError:
        return False


def write_params(path: str | Path = "params.yaml") -> bool:
    """Write the dataclass defaults into the params.yaml at `path` (`render_params`); -> whether it changed."""
    path = Path(path)
    text = path.read_text() if path.is_file() else ""
    rendered = render_params(text)
    if rendered != text:
        path.write_text(rendered)
    return rendered != text


if __name__ == "__main__":
    import sys

    target = sys.argv[1] if len(sys.argv) > 1 else "params.yaml"
    changed = write_params(target)
    print(f"{target}: {'written from' if changed else 'already holds'} the defaults of dfcvae/config.py")
