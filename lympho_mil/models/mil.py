"""Image-bag models: an instance encoder, a mask-aware pooling and a head (`MILNet`), or a head
on every crop (`InstanceNet`).

``AttentionMIL``, ``GatedAttentionMIL``, ``MeanPoolMIL``, ``MaxPoolMIL`` and
``StatisticsPoolMIL`` differ only by their pooling; ``InstanceMIL`` classifies every crop
and averages the crop logits.
"""

from __future__ import annotations

from abc import abstractmethod
from typing import Any

from torch import Tensor, nn

from lympho_mil.arguments import as_settings, check_positive, check_share
from lympho_mil.data.batch import BagBatch
from lympho_mil.data.errors import DataError
from lympho_mil.models.base import BagClassifier, BagOutput
from lympho_mil.nn import (
    EncoderSettings,
    InstanceNet,
    MILNet,
    build_encoder,
    build_pooling,
    crop_bce,
)
from lympho_mil.nn.encoders import encoder_out_dim


class EncoderClassifier(BagClassifier):
    """Base of the models that encode every crop: the encoder's settings, and the check that
    the data suits it.

    Args:
        encoder: the instance encoder (`lympho_mil.nn.EncoderSettings`: ``name``,
            ``out_dim``, ``in_dim`` for feature bags, ``kwargs``, ``weights``, ``freeze``,
            ``shape_multiple``, ``channels_last``, ``compile``).
        chunk_size: encode at most this many crops at once (bounds memory on big bags).
        **kwargs: clinical, loss, optimiser, threshold and test-time settings of
            `BagClassifier`.
    """

    def __init__(
        self,
        encoder: EncoderSettings = EncoderSettings(),
        chunk_size: int | None = 128,
        **kwargs: Any,
    ) -> None:
        check_positive(chunk_size=chunk_size)
        self.encoder_settings = as_settings(EncoderSettings, encoder)
        self.chunk_size = chunk_size
        super().__init__(**kwargs)

    def why_no_views(self) -> str | None:
        settings = self.encoder_settings
        if settings.reads_features:
            return f"reads feature vectors (encoder {settings.name!r}), which have no orientation"
        return None

    def build_encoder(self) -> nn.Module:
        """The instance encoder of `encoder_settings` (`lympho_mil.nn.build_encoder`)."""
        return build_encoder(self.encoder_settings)

    def check_instances(self, batch: BagBatch) -> None:
        """Encoders of features need float[B, N, in_dim] feature bags; the others image crops
        float[B, N, C, H, W]."""
        settings, shape = self.encoder_settings, tuple(batch.instances.shape)
        if settings.reads_features:
            wanted = f"feature bags of {settings.in_dim} values per crop"
            fits = len(shape) == 3 and shape[-1] == settings.in_dim
        else:
            wanted, fits = "image crops [B, N, C, H, W]", len(shape) == 5
        if not fits:
            raise DataError(
                f"{type(self).__name__} reads {wanted} (encoder {settings.name!r}) but the data "
                f"gives instances of shape {shape}: use the data settings it was trained with, "
                "or set the encoder's in_dim to the data's feature size"
            )

    @property
    def net_chunking(self) -> dict[str, int | None]:
        """``chunk_size`` and ``shape_multiple`` of the network's encoder calls."""
        return {
            "chunk_size": self.chunk_size,
            "shape_multiple": self.encoder_settings.shape_multiple,
        }


class MILClassifier(EncoderClassifier):
    """Instance encoder -> pooling -> linear head (`lympho_mil.nn.MILNet`).

    Each subclass fixes the pooling (``default_pooling``: a key of `lympho_mil.nn.POOLINGS`).

    Args:
        encoder, chunk_size: see `EncoderClassifier`.
        attention_hidden: hidden size of the attention network (attention poolings only).
        dropout: dropout before the head.
        **kwargs: settings of `BagClassifier`.
    """

    @property
    @abstractmethod
    def default_pooling(self) -> str:
        """The pooling a subclass fixes (a class attribute)."""

    def __init__(
        self,
        encoder: EncoderSettings = EncoderSettings(),
        chunk_size: int | None = 128,
        attention_hidden: int = 128,
        dropout: float = 0.0,
        **kwargs: Any,
    ) -> None:
        check_positive(attention_hidden=attention_hidden)
        check_share("dropout", dropout, one_allowed=False)
        self.attention_hidden = attention_hidden
        self.dropout = dropout
        super().__init__(encoder=encoder, chunk_size=chunk_size, **kwargs)

    def build_net(self) -> MILNet:
        encoder = self.build_encoder()
        dim = encoder_out_dim(encoder)
        pooling = build_pooling(self.default_pooling, dim, self.attention_hidden)
        return MILNet(encoder, pooling, self.dropout, **self.net_chunking)


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
    embeddings (`lympho_mil.nn.StatisticsPooling`); with the ``identity`` encoder on cached
    crop features, a linear model of the patient-level statistics. Arguments as
    `MILClassifier` (``attention_hidden`` unused)."""

    default_pooling = "statistics"


class InstanceMIL(EncoderClassifier):
    """Per-crop baseline (`lympho_mil.nn.InstanceNet`): every crop is classified with its
    patient's label; the patient logit is the mean of its crop logits (the per-image CNN of
    the original study).

    Args:
        encoder, chunk_size: see `EncoderClassifier`.
        dropout: dropout before the head.
        **kwargs: settings of `BagClassifier`.
    """

    def __init__(
        self,
        encoder: EncoderSettings = EncoderSettings(),
        chunk_size: int | None = 128,
        dropout: float = 0.0,
        **kwargs: Any,
    ) -> None:
        check_share("dropout", dropout, one_allowed=False)
        self.dropout = dropout
        super().__init__(encoder=encoder, chunk_size=chunk_size, **kwargs)

    def build_net(self) -> InstanceNet:
        return InstanceNet(self.build_encoder(), self.dropout, **self.net_chunking)

    def loss(self, out: BagOutput, batch: BagBatch) -> Tensor:
        """BCE of every crop against its patient's label, averaged per patient then overall."""
        assert out.instance_logits is not None
        return crop_bce(out.instance_logits, batch.label, batch.mask, self.pos_weight)
