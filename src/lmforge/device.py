"""Where tensors live: the device to run on and its default dtype, chosen and checked in one place."""

from __future__ import annotations

import torch

from .errors import LMForgeError


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def parse_device(device: torch.device | str) -> torch.device:
    try:
        dev = torch.device(device)
    except (RuntimeError, ValueError):
        raise LMForgeError(f"invalid device {device!r} (use cpu, cuda or cuda:N)") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise LMForgeError(f"device {device!r} requested, but CUDA is not available")
    if dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
        raise LMForgeError(f"device {device!r} requested, but only {torch.cuda.device_count()} CUDA devices exist")
    return dev


def default_dtype(device: torch.device) -> torch.dtype:
    # bf16 on GPUs; fp32 on CPU, where bf16 matmuls are far slower.
    if device.type == "cuda" and torch.cuda.is_bf16_supported():
        return torch.bfloat16
    return torch.float32


def placement(device: torch.device | str | None = None, dtype: torch.dtype | None = None
              ) -> tuple[torch.device, torch.dtype]:
    """The device (default: CUDA when present) and dtype (default: that device's) to load onto."""
    dev = parse_device(device) if device is not None else default_device()
    return dev, dtype or default_dtype(dev)


def prepare_inference(device: torch.device) -> None:
    """Process-wide settings for running a loaded model on ``device``.

    On CUDA, scaled-dot-product attention leaves out cuDNN's backend: it builds a new graph for every
    key length it meets (about 2 ms of host time per call, against microseconds of GPU work), and decoding
    meets a new length every step, which made a 30-layer decode step 60 ms slower. Flash and
    memory-efficient attention take its place, with the same results up to rounding.
    """
    if device.type == "cuda":
        torch.backends.cuda.enable_cudnn_sdp(False)
