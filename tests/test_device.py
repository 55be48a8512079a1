"""Device placement and the process-wide settings for running on a device."""

from __future__ import annotations

import pytest
import torch

from lmforge.device import prepare_inference


@pytest.fixture
def cudnn_sdp():
    before = torch.backends.cuda.cudnn_sdp_enabled()
    torch.backends.cuda.enable_cudnn_sdp(True)
    yield
    torch.backends.cuda.enable_cudnn_sdp(before)


def test_cuda_inference_leaves_out_cudnn_attention(cudnn_sdp) -> None:
    # cuDNN's attention rebuilds its graph for every new key length: decoding must not use it.
    prepare_inference(torch.device("cuda"))
    assert not torch.backends.cuda.cudnn_sdp_enabled()
    assert torch.backends.cuda.flash_sdp_enabled() and torch.backends.cuda.mem_efficient_sdp_enabled()


def test_cpu_inference_changes_no_cuda_setting(cudnn_sdp) -> None:
    prepare_inference(torch.device("cpu"))
    assert torch.backends.cuda.cudnn_sdp_enabled()
