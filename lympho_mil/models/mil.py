"""Image-bag models: an instance encoder, a mask-aware pooling and a head.

``AttentionMIL``, ``GatedAttentionMIL``, ``MeanPoolMIL``, ``MaxPoolMIL`` and
``StatisticsPoolMIL`` differ only by their pooling; ``InstanceMIL`` classifies every crop
and averages the crop logits.
"""

from __future__ import annotations

from abc import abstractmethod
from typing import Any

import torch
from torch import Tensor, nn

from lympho_mil.arguments import SettingError, check_positive, check_share
from lympho_mil.data.batch import BagBatch
from lympho_mil.data.errors import DataError
from lympho_mil.models.acceleration import use_channels_last
from lympho_mil.models.base import BagClassifier, BagOutput
from lympho_mil.nn import build_instance_encoder, build_pooling, encode_instances, freeze
from lympho_mil.nn.encoders import FEATURE_ENCODERS, encoder_out_dim


class EncoderMixin:
    """Builds the instance encoder from flat, CLI-friendly settings and checks that the data
    suits it."""

    encoder_settings: tuple[Any, ...]  # the arguments of build_encoder, in its order
    tta_views: int  # set by BagClassifier before configure_models builds the encoder

    @staticmethod
    def check_encoder_settings(
        embed_dim: int,
        in_dim: int | None,
        chunk_size: int | None,
        shape_multiple: int | None,
        dropout: float,
    ) -> None:
        """SettingError for an encoder setting that cannot work."""
        check_positive(
            embed_dim=embed_dim, in_dim=in_dim, chunk_size=chunk_size, shape_multiple=shape_multiple
        )
        check_share("dropout", dropout, one_allowed=False)

    def check_instances(self, batch: BagBatch) -> None:
        """Feature encoders (`FEATURE_ENCODERS`) need float[B, N, in_dim] feature bags; the
        others image crops float[B, N, C, H, W]."""
        encoder, _, in_dim = self.encoder_settings[:3]
        shape = tuple(batch.instances.shape)
        if encoder in FEATURE_ENCODERS:
            wanted = f"feature bags of {in_dim} values per crop"
            fits = len(shape) == 3 and shape[-1] == in_dim
        else:
            wanted, fits = "image crops [B, N, C, H, W]", len(shape) == 5
        if not fits:
            raise DataError(
                f"{type(self).__name__} reads {wanted} (encoder {encoder!r}) but the data gives "
                f"instances of shape {shape}: use the data settings it was trained with"
            )

    def build_encoder(
        self,
        encoder: str,
        embed_dim: int,
        in_dim: int | None,
        encoder_kwargs: dict[str, Any] | None,
        encoder_weights: str | None,
        freeze_encoder: bool,
        channels_last: bool = False,
        compile_encoder: bool = False,
    ) -> nn.Module:
        if encoder in FEATURE_ENCODERS and self.tta_views != 1:
            raise SettingError(
                f"encoder {encoder!r} reads feature vectors, which have no orientation: "
                "test-time augmentation needs image crops (tta_views must be 1)"
            )
        module = build_instance_encoder(
            encoder,
            in_dim=in_dim,
            out_dim=embed_dim,
            weights_path=encoder_weights,
            **(encoder_kwargs or {}),
        )
        if freeze_encoder:
            freeze(module)
        if channels_last:
            use_channels_last(module)
        if compile_encoder:
            module.compile()  # in place: state_dict keys stay unprefixed, checkpoints portable
        return module


def fallback_weights(h: Tensor, mask: Tensor, pooling: str) -> Tensor:
    """Crop weights for poolings without attention, float[B, N] summing to 1 per bag.

    Mean pooling: uniform over the real crops. Max pooling: the share of embedding
    dimensions whose maximum each crop holds, a tie shared by the crops that hold it (a
    ReLU dimension that is 0 on every crop credits them all alike, not the first).
    """
    if pooling == "max":
        masked = h.float().masked_fill(~mask.unsqueeze(-1), float("-inf"))
        holds = (masked == masked.amax(dim=1, keepdim=True)) & mask.unsqueeze(-1)  # [B, N, D]
        share = holds.float() / holds.sum(dim=1, keepdim=True).clamp(min=1)
        return share.sum(dim=-1) / h.shape[-1]
    uniform = mask.float()
    return uniform / uniform.sum(dim=1, keepdim=True)


class MILClassifier(EncoderMixin, BagClassifier):
    """Instance encoder -> pooling -> linear head.

    Each subclass fixes the pooling (``default_pooling``: "attention", "gated_attention",
    "mean" or "max"); `GatedFusionMIL` takes it as an argument.

    Args:
        encoder: "small_cnn" (fast on CPU, GroupNorm), "lenet" (28 px digits), "morphology"
            (fixed hand-crafted features of the centred cell), "mlp" or "identity"
            (precomputed features, need ``in_dim``), or any timm model name.
        embed_dim: output size of "small_cnn", "lenet" and "mlp" (the others keep their
            own).
        in_dim: feature size of precomputed feature bags: set it to the datamodule's
            (``FeatureBagDataModule.in_dim``, ``CachedFeatureDataModule.feature_dim``).
        encoder_kwargs: extra constructor arguments of the encoder.
        encoder_weights: local weights file of the encoder (a timm backbone's or a built-in
            encoder's state dict; nothing is downloaded).
        freeze_encoder: keep the encoder fixed (eval mode, no gradients).
        chunk_size: encode at most this many crops at once (bounds memory on big bags).
        shape_multiple: top each encoder call up to a multiple of this many crops (repeats,
            outputs dropped; see `encode_instances`): a few input shapes
            instead of one per number of crops in a batch, for cuDNN plans and compiled
            encoders on a GPU. 16 costs about 3 % more encoder work at 256 crops a step.
        channels_last: keep the encoder's weights and 4-D inputs channels-last (faster convs
            on CUDA under mixed precision; see `lympho_mil.models.acceleration`).
        compile_encoder: ``torch.compile`` the encoder (in place: checkpoints stay loadable
            with or without it). Compilation costs seconds to minutes at the first batches.
        attention_hidden: hidden size of the attention network (attention poolings only).
        dropout: dropout before the head.
        **kwargs: clinical, loss, optimiser, threshold and test-time settings of
            `BagClassifier`.
    """

    @property
    @abstractmethod
    def default_pooling(self) -> str:
        """The pooling a subclass fixes (a class attribute; GatedFusionMIL's is per model)."""

    def __init__(
        self,
        encoder: str = "small_cnn",
        embed_dim: int = 128,
        in_dim: int | None = None,
        encoder_kwargs: dict[str, Any] | None = None,
        encoder_weights: str | None = None,
        freeze_encoder: bool = False,
        chunk_size: int | None = 128,
        shape_multiple: int | None = None,
        channels_last: bool = False,
        compile_encoder: bool = False,
        attention_hidden: int = 128,
        dropout: float = 0.0,
        **kwargs: Any,
    ) -> None:
        self.check_encoder_settings(embed_dim, in_dim, chunk_size, shape_multiple, dropout)
        check_positive(attention_hidden=attention_hidden)
        self.encoder_settings = (
            encoder,
            embed_dim,
            in_dim,
            encoder_kwargs,
            encoder_weights,
            freeze_encoder,
            channels_last,
            compile_encoder,
        )
        self.pooling_name = self.default_pooling
        self.chunk_size = chunk_size
        self.shape_multiple = shape_multiple
        self.attention_hidden = attention_hidden
        self.dropout = dropout
        super().__init__(**kwargs)
        self.save_hyperparameters()

    def configure_models(self) -> None:
        self.configure_bag_embedding()
        self.head = nn.Sequential(nn.Dropout(self.dropout), nn.Linear(self.bag_dim, 1))

    def configure_bag_embedding(self) -> None:
        """The instance encoder and the pooling (shared with the fusion model); ``bag_dim`` is
        the size of the pooled embedding."""
        self.encoder = self.build_encoder(*self.encoder_settings)
        dim = encoder_out_dim(self.encoder)
        self.pooling = build_pooling(self.pooling_name, dim, self.attention_hidden)
        self.bag_dim = self.pooling.output_dim(dim)

    def embed(self, batch: BagBatch) -> tuple[Tensor, Tensor]:
        """Pooled bag embedding z[B, D] and crop weights[B, N]."""
        return self.pool(self.encode(batch), batch.mask)

    def encode(self, batch: BagBatch) -> Tensor:
        """Crop embeddings h[B, N, D]."""
        return encode_instances(
            self.encoder, batch.instances, batch.mask, self.chunk_size, self.shape_multiple
        )

    def pool(self, h: Tensor, mask: Tensor) -> tuple[Tensor, Tensor]:
        """``h[B, N, D]``, ``mask[B, N]`` -> bag embedding z[B, D'] and crop weights[B, N]."""
        z, weights = self.pooling(h, mask)
        if weights is None:
            weights = fallback_weights(h, mask, self.pooling_name)
        return z, weights

    def forward(self, batch: BagBatch) -> BagOutput:
        z, weights = self.embed(batch)
        return BagOutput(logit=self.head(z).squeeze(-1), weights=weights)


class AttentionMIL(MILClassifier):
    """Attention-based deep MIL (Ilse et al., ICML 2018): ``z = sum_i a_i h_i``.

    Arguments as `MILClassifier`.
    """

    default_pooling = "attention"


class GatedAttentionMIL(MILClassifier):
    """Gated attention MIL (Ilse et al., ICML 2018). Arguments as `MILClassifier`."""

    default_pooling = "gated_attention"


class MeanPoolMIL(MILClassifier):
    """Mean of the crop embeddings. Arguments as `MILClassifier` (``attention_hidden``
    unused)."""

    default_pooling = "mean"


class MaxPoolMIL(MILClassifier):
    """Element-wise max of the crop embeddings. Arguments as `MILClassifier`
    (``attention_hidden`` unused)."""

    default_pooling = "max"


class StatisticsPoolMIL(MILClassifier):
    """Per feature, the mean, standard deviation and 10/50/90 % quantiles of the crop
    embeddings (`lympho_mil.nn.StatisticsPooling`); with ``encoder="identity"`` on cached
    crop features, a linear model of the patient-level statistics. Arguments as
    `MILClassifier` (``attention_hidden`` unused)."""

    default_pooling = "statistics"


class InstanceMIL(EncoderMixin, BagClassifier):
    """Per-crop baseline: every crop is classified with its patient's label; the patient
    logit is the mean of its crop logits (the per-image CNN of the original study).

    Arguments as `MILClassifier`, without ``attention_hidden`` (no pooling).
    """

    def __init__(
        self,
        encoder: str = "small_cnn",
        embed_dim: int = 128,
        in_dim: int | None = None,
        encoder_kwargs: dict[str, Any] | None = None,
        encoder_weights: str | None = None,
        freeze_encoder: bool = False,
        chunk_size: int | None = 128,
        shape_multiple: int | None = None,
        channels_last: bool = False,
        compile_encoder: bool = False,
        dropout: float = 0.0,
        **kwargs: Any,
    ) -> None:
        self.check_encoder_settings(embed_dim, in_dim, chunk_size, shape_multiple, dropout)
        self.encoder_settings = (
            encoder,
            embed_dim,
            in_dim,
            encoder_kwargs,
            encoder_weights,
            freeze_encoder,
            channels_last,
            compile_encoder,
        )
        self.chunk_size = chunk_size
        self.shape_multiple = shape_multiple
        self.dropout = dropout
        super().__init__(**kwargs)
        self.save_hyperparameters()

    def configure_models(self) -> None:
        self.encoder = self.build_encoder(*self.encoder_settings)
        dim = encoder_out_dim(self.encoder)
        self.head = nn.Sequential(nn.Dropout(self.dropout), nn.Linear(dim, 1))

    def forward(self, batch: BagBatch) -> BagOutput:
        h = encode_instances(
            self.encoder, batch.instances, batch.mask, self.chunk_size, self.shape_multiple
        )
        crop_logits = self.head(h).squeeze(-1).float().masked_fill(~batch.mask, 0.0)
        n = batch.mask.sum(dim=1).clamp(min=1)
        weights = batch.mask.float() / n.unsqueeze(1)
        return BagOutput(
            logit=crop_logits.sum(dim=1) / n, weights=weights, instance_logits=crop_logits
        )

    def loss(self, out: BagOutput, batch: BagBatch) -> Tensor:
        """BCE of every crop against its patient's label, averaged per patient then overall."""
        assert out.instance_logits is not None
        target = batch.label.unsqueeze(1).expand_as(out.instance_logits)
        pos_weight = None
        if self.pos_weight is not None:
            pos_weight = torch.tensor(self.pos_weight, device=target.device)
        per_crop = nn.functional.binary_cross_entropy_with_logits(
            out.instance_logits, target, pos_weight=pos_weight, reduction="none"
        )
        per_bag = (per_crop * batch.mask).sum(dim=1) / batch.mask.sum(dim=1).clamp(min=1)
        return per_bag.mean()
