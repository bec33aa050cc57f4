"""The GPU benchmark's UNets are the real architectures: built on the meta device (no memory, no weights), they have
the published parameter counts of SD1.5 (859.52 M) and SDXL base 1.0 (2567.46 M)."""

# diffusers ships no type hints for its constructors.
# mypy: disable-error-code="no-untyped-call"

from __future__ import annotations

from typing import Any

import pytest
import torch
from bench.trainer import SD15_UNET, SDXL_UNET
from diffusers import UNet2DConditionModel


@pytest.mark.parametrize(
    ("config", "millions"), [(SD15_UNET, 859.520964), (SDXL_UNET, 2567.463684)], ids=["sd15", "sdxl"]
)
def test_real_unet_configs_have_the_published_size(config: dict[str, Any], millions: float) -> None:
    with torch.device("meta"):
        unet: Any = UNet2DConditionModel(**config)
    assert sum(p.numel() for p in unet.parameters()) == round(millions * 1e6)
