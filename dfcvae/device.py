"""The device policy: what the hardware allows, in one place."""

from __future__ import annotations

from dataclasses import dataclass

import torch


def default_device() -> torch.device:
    """The first CUDA device where there is one, else the CPU: every stage's choice."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


@dataclass(frozen=True)
class Runtime:
    """What the hardware allows: bf16 autocast, channels_last, fused Adam on GPU only."""

    device: torch.device

    @property
    def on_gpu(self) -> bool:
        return self.device.type == "cuda"

    @property
    def memory_format(self) -> torch.memory_format:
        return torch.channels_last if self.on_gpu else torch.contiguous_format

    def autocast(self):
        return torch.autocast("cuda", dtype=torch.bfloat16, enabled=self.on_gpu)
