"""Numerics of the GPU training step (bf16 autocast against fp32 on the same batch), and
batches delivered to the GPU."""

import pytest
import torch

from dfcvae.config import Config
from dfcvae.device import Runtime
from dfcvae.features import PerceptualNetwork
from dfcvae.loss import dfc_vae_loss
from dfcvae.shards.loader import make_loader
from dfcvae.step import build_model, build_optimizer, build_perceptual, make_train_step

pytestmark = pytest.mark.gpu
requires_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def _cfg(**overrides) -> Config:
    base = {"perceptual.weights": "random", "perceptual.layers": ["relu3_1", "relu3_4", "relu4_3", "relu5_2"]}
    return Config().with_overrides({**base, **overrides})


@requires_cuda
def test_bf16_step_loss_matches_fp32_on_the_same_batch():
    cfg = _cfg()
    runtime = Runtime(torch.device("cuda"))
    torch.manual_seed(0)
    model = build_model(cfg, runtime)
    perceptual = build_perceptual(cfg, runtime)
    x = (torch.rand(32, 3, 64, 64, device="cuda") * 2 - 1).contiguous(memory_format=torch.channels_last)
    mu, logvar = model.encode(x)
    with torch.no_grad():
        recon = model.decode(mu)
        fp32, _ = dfc_vae_loss(x, recon, mu, logvar, perceptual, cfg.loss)
        with runtime.autocast():
            bf16, logs = dfc_vae_loss(x, recon, mu, logvar, perceptual, cfg.loss)
    assert bf16.dtype == torch.float32 and logs["train/perceptual"].dtype == torch.float32
    assert abs(bf16.item() - fp32.item()) <= 0.02 * abs(fp32.item())


def _step_losses(cfg: Config, x: torch.Tensor, steps: int) -> list[torch.Tensor]:
    """The logged losses of `steps` updates on x from the same initial weights, kept as tensors."""
    runtime = Runtime(torch.device("cuda"))
    torch.manual_seed(0)
    model = build_model(cfg, runtime)
    optimizer, scheduler = build_optimizer(model, cfg, runtime)
    step = make_train_step(model, build_perceptual(cfg, runtime), optimizer, scheduler, cfg, runtime)
    return [step(x)["train/loss"] for _ in range(steps)]


@requires_cuda
@pytest.mark.parametrize("mode", ["default", "reduce-overhead"])
def test_compiled_step_matches_eager_and_its_logs_outlive_later_steps(mode):
    """A compiled step (CUDA graphs with reduce-overhead) keeps the eager step's numerics, and
    the logs it returned still hold their values after later steps replayed the graph."""
    torch._inductor.config.fallback_random = True  # the same latent noise as eager, to compare numerics
    x = (torch.rand(32, 3, 64, 64, device="cuda") * 2 - 1).contiguous(memory_format=torch.channels_last)
    torch.manual_seed(1)
    eager = torch.stack(_step_losses(_cfg(**{"train.compile": False}), x, 4)).tolist()
    torch.manual_seed(1)
    kept = _step_losses(_cfg(**{"train.compile": True, "train.compile_mode": mode}), x, 4)
    compiled = torch.stack(kept).tolist()
    for a, b in zip(eager, compiled):
        assert abs(a - b) <= 0.02 * abs(a), (eager, compiled)
    assert len(set(compiled)) == len(compiled)  # each step's log is its own, not the last replay's


@requires_cuda
@pytest.mark.parametrize("compile", [False, True])
def test_gpu_step_keeps_frozen_network_and_stays_finite(compile):
    cfg = _cfg(**{"train.compile": compile})
    runtime = Runtime(torch.device("cuda"))
    model = build_model(cfg, runtime)
    optimizer, scheduler = build_optimizer(model, cfg, runtime)
    perceptual = build_perceptual(cfg, runtime)
    before = {k: v.clone() for k, v in perceptual.state_dict().items()}
    step = make_train_step(model, perceptual, optimizer, scheduler, cfg, runtime)
    x = (torch.rand(16, 3, 64, 64, device="cuda") * 2 - 1).contiguous(memory_format=torch.channels_last)
    losses = [float(step(x)["train/loss"]) for _ in range(5)]
    assert all(torch.isfinite(torch.tensor(losses)))
    assert isinstance(perceptual, PerceptualNetwork) and not perceptual.training
    for key, value in perceptual.state_dict().items():
        assert torch.equal(value, before[key]), key


@requires_cuda
def test_loader_copies_page_locked_slots_to_the_device(tmp_path):
    """Batches reach the GPU by DMA from page-locked shared slots, on a side stream the busy
    current stream waits for: the same bytes as the host path, intact after every slot's reuse."""
    from bench.throughput import make_shards, parse_args

    shards = make_shards(parse_args(["--smoke"]), tmp_path)  # 48 faces at 32 px, train split twice
    cfg = Config().with_overrides(
        {"data.shards_dir": shards, "data.image_size": 32, "loader.batch_size": 4, "loader.num_workers": 2}
    )
    host = [b["image"] for b in make_loader(cfg, "train", train=False, num_workers=0)]
    loader = make_loader(cfg, "train", train=False, device="cuda")
    on_device, locked = [], []
    for batch in loader:
        locked.append(loader.ring.page_locked)
        on_device.append(batch["image"].float())  # on the current stream, after the copy
        torch.cuda._sleep(1_000_000)  # keep the current stream busy, as a training step does
    assert all(locked) and len(on_device) == len(host) > loader.ring.slots
    for a, b in zip(host, on_device):
        assert b.is_cuda and torch.equal(a.float(), b.cpu())
