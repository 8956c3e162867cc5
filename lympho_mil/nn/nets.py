"""Whole networks, one per model family, in plain PyTorch: composed from an encoder, a pooling
and a fusion (or from other networks), each forward taking the batch contract's tensors and
returning one `BagOutput`.

Shapes: ``instances`` float[B, N, C, H, W] (crops) or float[B, N, D] (features), ``mask``
bool[B, N] (True where an instance is real), ``tabular`` float[B, T] (the raw clinical vector;
a network that reads it standardises it itself). The LightningModules of `lympho_mil.models`
hold one of these as ``self.net``; a plain torch loop can train one with
`lympho_mil.nn.bce_with_logits` on its ``logit``.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor, nn

from lympho_mil.nn.encoders import MLPEncoder, encode_instances, encoder_out_dim
from lympho_mil.nn.fusion import ConcatFusion, GatedFusion
from lympho_mil.nn.pooling import MaxPooling, MeanPooling, MILPooling
from lympho_mil.nn.tabular import Standardize


class BagOutput(NamedTuple):
    """What every network's forward returns.

    logit: float[B], the patient-level logit (probability = sigmoid(logit)).
    weights: float[B, N] or None, each crop's share of the decision (sums to 1 over the real
        crops, 0 on padding): attention for attention pooling, uniform for mean pooling, the
        share of embedding dimensions whose maximum the crop holds for max pooling.
    instance_logits: float[B, N] or None, per-crop logits where the network has them.
    extras: network-specific tensors, float[B] each: the fusion's ``gate``,
        ``image_logit`` and ``tabular_logit`` (its experts' logits).
    """

    logit: Tensor
    weights: Tensor | None = None
    instance_logits: Tensor | None = None
    extras: dict[str, Tensor] | None = None


def fallback_weights(h: Tensor, mask: Tensor, pooling: MILPooling) -> Tensor:
    """Crop weights for poolings without attention, float[B, N] summing to 1 per bag.

    Max pooling: the share of embedding dimensions whose maximum each crop holds, a tie
    shared by the crops that hold it (a ReLU dimension that is 0 on every crop credits them
    all alike, not the first). Any other: uniform over the real crops.
    """
    if isinstance(pooling, MaxPooling):
        masked = h.float().masked_fill(~mask.unsqueeze(-1), float("-inf"))
        holds = (masked == masked.amax(dim=1, keepdim=True)) & mask.unsqueeze(-1)  # [B, N, D]
        share = holds.float() / holds.sum(dim=1, keepdim=True).clamp(min=1)
        return share.sum(dim=-1) / h.shape[-1]
    uniform = mask.float()
    return uniform / uniform.sum(dim=1, keepdim=True)


class PooledBags(nn.Module):
    """Base of the networks that encode every real instance and pool them: ``encoder`` (an
    instance encoder with ``out_dim``) and ``pooling``, no parameters of its own.

    ``chunk_size`` and ``shape_multiple``: see `encode_instances` (at most that many crops per
    encoder call; calls topped up to a multiple of that many).
    """

    def __init__(
        self,
        encoder: nn.Module,
        pooling: MILPooling,
        chunk_size: int | None = None,
        shape_multiple: int | None = None,
    ) -> None:
        super().__init__()
        self.encoder = encoder
        self.pooling = pooling
        self.chunk_size = chunk_size
        self.shape_multiple = shape_multiple

    @property
    def bag_dim(self) -> int:
        """Size of the pooled bag embedding."""
        return self.pooling.output_dim(encoder_out_dim(self.encoder))

    def encode(self, instances: Tensor, mask: Tensor) -> Tensor:
        """Crop embeddings h[B, N, D] (zero on padding)."""
        return encode_instances(self.encoder, instances, mask, self.chunk_size, self.shape_multiple)

    def pool(self, h: Tensor, mask: Tensor) -> tuple[Tensor, Tensor]:
        """``h[B, N, D]``, ``mask[B, N]`` -> bag embedding z[B, D'] and crop weights[B, N]."""
        z, weights = self.pooling(h, mask)
        if weights is None:
            weights = fallback_weights(h, mask, self.pooling)
        return z, weights


class MILNet(PooledBags):
    """Instance encoder -> mask-aware pooling -> dropout -> linear head: attention MIL (Ilse
    et al. 2018) with `AttentionPooling`, and its gated, mean, max and statistics variants.

    ``forward(instances[B, N, ...], mask[B, N], tabular=None)`` -> `BagOutput` with ``logit[B]``
    and ``weights[B, N]``; ``tabular`` is ignored. ``dropout`` applies before the head.
    """

    def __init__(
        self,
        encoder: nn.Module,
        pooling: MILPooling,
        dropout: float = 0.0,
        chunk_size: int | None = None,
        shape_multiple: int | None = None,
    ) -> None:
        super().__init__(encoder, pooling, chunk_size, shape_multiple)
        self.head = nn.Sequential(nn.Dropout(dropout), nn.Linear(self.bag_dim, 1))

    def forward(self, instances: Tensor, mask: Tensor, tabular: Tensor | None = None) -> BagOutput:
        z, weights = self.pool(self.encode(instances, mask), mask)
        return BagOutput(logit=self.head(z).squeeze(-1), weights=weights)


class InstanceNet(nn.Module):
    """Every crop classified alone (the per-image CNN of the original study); the patient
    logit is the mean of its crop logits.

    ``forward(instances[B, N, ...], mask[B, N], tabular=None)`` -> `BagOutput` with
    ``logit[B]``, uniform ``weights[B, N]`` and the crop logits ``instance_logits[B, N]``
    (0 on padding; train them with `crop_bce`). ``dropout`` applies before the head;
    ``chunk_size``, ``shape_multiple``: see `encode_instances`.
    """

    def __init__(
        self,
        encoder: nn.Module,
        dropout: float = 0.0,
        chunk_size: int | None = None,
        shape_multiple: int | None = None,
    ) -> None:
        super().__init__()
        self.encoder = encoder
        self.head = nn.Sequential(nn.Dropout(dropout), nn.Linear(encoder_out_dim(encoder), 1))
        self.chunk_size = chunk_size
        self.shape_multiple = shape_multiple

    def forward(self, instances: Tensor, mask: Tensor, tabular: Tensor | None = None) -> BagOutput:
        h = encode_instances(self.encoder, instances, mask, self.chunk_size, self.shape_multiple)
        crop_logits = self.head(h).squeeze(-1).float().masked_fill(~mask, 0.0)
        n = mask.sum(dim=1).clamp(min=1)
        weights = mask.float() / n.unsqueeze(1)
        return BagOutput(
            logit=crop_logits.sum(dim=1) / n, weights=weights, instance_logits=crop_logits
        )


class TabularNet(nn.Module):
    """The clinical vector alone: standardise -> `MLPEncoder` -> linear head.

    ``forward(instances, mask, tabular[B, T])`` -> `BagOutput` with ``logit[B]``; the crops
    are ignored.
    """

    def __init__(self, standardize: Standardize, encoder: MLPEncoder) -> None:
        super().__init__()
        self.standardize = standardize
        self.tabular_encoder = encoder
        self.head = nn.Linear(encoder.out_dim, 1)

    def forward(self, instances: Tensor, mask: Tensor, tabular: Tensor) -> BagOutput:
        z = self.tabular_encoder(self.standardize(tabular))
        return BagOutput(logit=self.head(z).squeeze(-1))


class GatedFusionNet(PooledBags):
    """Image bag + clinical vector (Sahasrabudhe et al., IEEE JBHI 2021): the pooled crop
    embedding and the clinical embedding (standardise -> `MLPEncoder`) enter ``fusion``, a
    `GatedFusion` (mixture of an image and a clinical expert) or a `ConcatFusion`.

    ``forward(instances[B, N, ...], mask[B, N], tabular[B, T])`` -> `BagOutput` with
    ``logit[B]`` (the mixture's, for gated fusion), ``weights[B, N]`` and, for gated fusion,
    ``extras`` ``gate``, ``image_logit`` and ``tabular_logit`` (float[B]). With mean pooling
    and gated fusion, the image expert (linear) scores each crop alone: ``instance_logits``
    are these crop logits, whose mean is the image expert's logit.
    """

    def __init__(
        self,
        encoder: nn.Module,
        pooling: MILPooling,
        standardize: Standardize,
        tabular_encoder: MLPEncoder,
        fusion: GatedFusion | ConcatFusion,
        chunk_size: int | None = None,
        shape_multiple: int | None = None,
    ) -> None:
        super().__init__(encoder, pooling, chunk_size, shape_multiple)
        self.standardize = standardize
        self.tabular_encoder = tabular_encoder
        self.fusion = fusion

    def forward(self, instances: Tensor, mask: Tensor, tabular: Tensor) -> BagOutput:
        h = self.encode(instances, mask)
        z_img, weights = self.pool(h, mask)
        z_tab = self.tabular_encoder(self.standardize(tabular))
        fused = self.fusion(z_img, z_tab)
        crop_logits = None
        if isinstance(self.pooling, MeanPooling) and isinstance(self.fusion, GatedFusion):
            # the image expert is linear on the mean crop: its logit is the mean of these
            crop_logits = self.fusion.image_head(h).squeeze(-1).float()
            crop_logits = crop_logits.masked_fill(~mask, 0.0)
        experts = (
            ("gate", fused.gate),
            ("image_logit", fused.image_logit),
            ("tabular_logit", fused.tabular_logit),
        )
        extras = {k: v for k, v in experts if v is not None}
        return BagOutput(
            logit=fused.logit, weights=weights, instance_logits=crop_logits, extras=extras
        )


class LogitSumNet(nn.Module):
    """Product of experts: a clinical expert and image experts, each a whole network of its
    own, the patient logit the clinical expert's plus the mean of the image experts'.

    With calibrated experts whose inputs are independent given the label, adding their
    log-odds is the Bayes combination (a product of experts); averaging the image experts
    first counts the crops once, however many summaries of them are read. Each expert is
    trained on the label by itself (`lympho_mil.models.LogitSumMIL`).

    ``forward(instances[B, N, D], mask[B, N], tabular[B, T])`` -> `BagOutput` with
    ``logit[B]``, ``weights[B, N]`` (the image experts' mean) and ``extras``:
    ``tabular_logit``, ``image_logit`` (the image experts' mean) and ``<name>_logit`` for
    every image expert (float[B] each).

    Args:
        clinical: the clinical expert (a `TabularNet`).
        images: the image experts by name (networks of the crops, such as `MILNet` on
            `lympho_mil.nn.encoders.FeatureColumns` of cached features); at least one.
    """

    def __init__(self, clinical: nn.Module, images: dict[str, nn.Module]) -> None:
        super().__init__()
        if not images:
            raise ValueError("LogitSumNet needs at least one image expert")
        if {"tabular", "image"} & set(images):
            raise ValueError("image experts may not be named 'tabular' or 'image' (their logits')")
        self.clinical = clinical
        self.images = nn.ModuleDict(images)

    def forward(self, instances: Tensor, mask: Tensor, tabular: Tensor) -> BagOutput:
        tabular_logit = self.clinical(instances, mask, tabular).logit.float()
        outputs = {name: net(instances, mask) for name, net in self.images.items()}
        image_logit = torch.stack([out.logit.float() for out in outputs.values()]).mean(dim=0)
        crop_weights = [out.weights for out in outputs.values() if out.weights is not None]
        weights = torch.stack(crop_weights).float().mean(dim=0) if crop_weights else None
        extras = {f"{name}_logit": out.logit.float() for name, out in outputs.items()}
        extras.update(tabular_logit=tabular_logit, image_logit=image_logit)
        return BagOutput(logit=tabular_logit + image_logit, weights=weights, extras=extras)
