"""The hand-crafted morphology encoder on drawn cells of known geometry and colour."""

from __future__ import annotations

import math

import pytest
import torch
from torch import Tensor

from lympho_mil.nn import MORPHOLOGY_FEATURES, MorphologyEncoder, build_instance_encoder
from lympho_mil.nn.morphology import _masked_quantiles, reconstruct

SIDE = 64
BACKGROUND = (0.95, 0.88, 0.78)  # beige, bright
RED_CELL = (0.80, 0.65, 0.70)  # pink
NUCLEUS = (0.35, 0.15, 0.55)  # dark blue-violet: B - G = 0.4, G = 0.15


def feature(out: Tensor, name: str) -> Tensor:
    return out[:, MORPHOLOGY_FEATURES.index(name)]


def ellipse(cy: float, cx: float, ry: float, rx: float) -> Tensor:
    """bool[SIDE, SIDE] inside the axis-aligned ellipse."""
    ys, xs = torch.meshgrid(torch.arange(SIDE), torch.arange(SIDE), indexing="ij")
    return ((ys - cy) / ry) ** 2 + ((xs - cx) / rx) ** 2 <= 1.0


def paint(*shapes: tuple[Tensor, tuple[float, float, float]]) -> Tensor:
    """An RGB crop [3, SIDE, SIDE] in [0, 1]: background, then each (mask, colour) in turn."""
    img = torch.tensor(BACKGROUND).view(3, 1, 1).repeat(1, SIDE, SIDE)
    for mask, colour in shapes:
        img[:, mask] = torch.tensor(colour).view(3, 1)
    return img


def encode(*crops: Tensor) -> Tensor:
    """Crops in [0, 1] -> features, through the loaders' ImageNet normalisation."""
    encoder = MorphologyEncoder()
    x = (torch.stack(crops) - encoder.mean) / encoder.std
    return encoder(x)


CENTRED = ellipse(31.5, 31.5, 10, 10)


def test_shape_dtype_and_no_parameters() -> None:
    encoder = MorphologyEncoder()
    out = encoder(torch.randn(5, 3, SIDE, SIDE, dtype=torch.float64))
    assert out.shape == (5, len(MORPHOLOGY_FEATURES)) == (5, encoder.out_dim)
    assert out.dtype == torch.float32 and torch.isfinite(out).all()
    assert not list(encoder.parameters())


def test_constants_are_made_on_the_inputs_device() -> None:
    """Feature extraction runs on the Trainer's device: no helper may fall back to the CPU
    (the meta device stands in for CUDA here; tests/test_cuda.py runs the whole encoder)."""
    nucleus = torch.zeros(2, 1, SIDE, SIDE, dtype=torch.bool, device="meta")
    values = torch.zeros(2, 1, SIDE, SIDE, device="meta")
    assert MorphologyEncoder._shape(nucleus).device.type == "meta"
    assert _masked_quantiles(values, nucleus, (0.1, 0.9)).shape == (2, 2)


def test_built_by_name() -> None:
    encoder = build_instance_encoder("morphology", blue_excess=0.3)
    assert isinstance(encoder, MorphologyEncoder) and encoder.blue_excess == 0.3


def test_round_nucleus_geometry_and_colour() -> None:
    out = encode(paint((CENTRED, NUCLEUS)))[0]
    area = CENTRED.sum().item()
    diameter = feature(out[None], "nucleus_diameter").item() * SIDE
    assert diameter == pytest.approx(math.sqrt(4 * area / math.pi), rel=1e-4)
    assert diameter == pytest.approx(20, rel=0.05)
    assert feature(out[None], "nucleus_eccentricity").item() < 0.15
    assert feature(out[None], "nucleus_solidity").item() == pytest.approx(1.0, abs=0.01)
    assert feature(out[None], "nucleus_offset").item() < 0.01
    colour = [feature(out[None], f"nucleus_{c}").item() for c in ("red", "green", "blue")]
    assert colour == pytest.approx(list(NUCLEUS), abs=1e-5)
    assert feature(out[None], "nucleus_grey_std").item() == pytest.approx(0.0, abs=1e-5)
    assert feature(out[None], "other_nuclear_fraction").item() == 0.0


def test_elongated_and_indented_nuclei() -> None:
    round_, long_ = encode(paint((CENTRED, NUCLEUS)), paint((ellipse(31.5, 31.5, 6, 16), NUCLEUS)))
    assert feature(long_[None], "nucleus_eccentricity") > 0.85
    major = feature(long_[None], "nucleus_major_axis").item() * SIDE
    minor = feature(long_[None], "nucleus_minor_axis").item() * SIDE
    assert major == pytest.approx(32, rel=0.1) and minor == pytest.approx(12, rel=0.15)
    notch = CENTRED & ~ellipse(31.5, 43, 5, 6)  # a bite out of one side
    (bitten,) = encode(paint((notch, NUCLEUS)))
    assert feature(bitten[None], "nucleus_solidity") < feature(round_[None], "nucleus_solidity")


def test_only_the_centred_nucleus_is_measured() -> None:
    neighbour = ellipse(8, 8, 6, 6)
    alone, crowded = encode(
        paint((CENTRED, NUCLEUS)), paint((CENTRED, NUCLEUS), (neighbour, NUCLEUS))
    )
    shape = [MORPHOLOGY_FEATURES.index(n) for n in MORPHOLOGY_FEATURES if n.startswith("nucleus")]
    torch.testing.assert_close(alone[shape], crowded[shape])
    assert feature(crowded[None], "other_nuclear_fraction").item() == pytest.approx(
        neighbour.float().mean().item(), rel=1e-4
    )


def test_rings_and_context_see_cytoplasm_and_red_cells() -> None:
    cytoplasm = ellipse(31.5, 31.5, 15, 15)
    pale_blue = (0.75, 0.75, 0.85)
    red_cells = ellipse(31.5, 6, 6, 6) | ellipse(31.5, 57, 6, 6)
    bare, with_cytoplasm = encode(
        paint((red_cells, RED_CELL), (CENTRED, NUCLEUS)),
        paint((red_cells, RED_CELL), (cytoplasm, pale_blue), (CENTRED, NUCLEUS)),
    )
    assert feature(bare[None], "ring4_bluish").item() == 0.0
    assert feature(with_cytoplasm[None], "ring4_bluish").item() == pytest.approx(1.0)
    assert feature(bare[None], "red_cell_fraction").item() == pytest.approx(
        red_cells.float().mean().item(), rel=1e-4
    )
    assert feature(bare[None], "background_fraction").item() > 0.5


def test_dihedral_views_give_nearly_the_same_features() -> None:
    crop = paint((ellipse(30, 34, 8, 13), NUCLEUS), (ellipse(8, 50, 5, 5), RED_CELL))
    crop = crop + 0.05 * torch.rand(crop.shape, generator=torch.Generator().manual_seed(0))
    views = [crop, crop.flip(-1), crop.rot90(1, (-2, -1)), crop.rot90(2, (-2, -1))]
    out = encode(*[v.clamp(0, 1) for v in views])
    torch.testing.assert_close(out[1:], out[:1].expand(3, -1), atol=0.02, rtol=0.02)


def test_no_nucleus_at_the_centre_gives_zeros_not_nans() -> None:
    (empty,) = encode(paint((ellipse(8, 8, 5, 5), NUCLEUS)))
    assert torch.isfinite(empty).all()
    assert feature(empty[None], "nucleus_diameter").item() == 0.0


def test_reconstruct_keeps_the_seeded_component() -> None:
    mask = torch.zeros(1, 1, 9, 9, dtype=torch.bool)
    mask[..., 1:4, 1:4] = True  # seeded component
    mask[..., 6:8, 6:8] = True  # separate component
    seed = torch.zeros_like(mask)
    seed[..., 2, 2] = True
    region = reconstruct(mask, seed)
    assert region[..., 1:4, 1:4].all() and not region[..., 6:8, 6:8].any()
