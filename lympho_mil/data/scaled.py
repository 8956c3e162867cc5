"""Datamodules of feature vectors standardised with statistics of the training patients.

The standardisation (`FeatureScaling`: clip to the training range, z-score) is fitted per
split and saved in checkpoints, so ``predict`` on other patients (another folder, another
split) scales the features exactly as in training. `ScaledFeatures` owns that state for
`FeatureBagDataModule` and `CachedFeatureDataModule`.
"""

from __future__ import annotations

from typing import Any

from lympho_mil.data.errors import DataError
from lympho_mil.data.transforms import FeatureScaling


class ScaledFeatures:
    """Mixin of a datamodule whose ``scaling`` (or None) is its checkpoint state.

    A subclass says how long a feature vector is (`scaled_size`) and applies a restored
    standardisation to what it has already set up (`use_scaling`).
    """

    scaling: FeatureScaling | None = None

    def scaled_size(self) -> int:
        """D, the length of the feature vectors the standardisation applies to."""
        raise NotImplementedError

    def use_scaling(self, scaling: FeatureScaling) -> None:
        """Apply a checkpoint's standardisation to the datasets already set up."""
        raise NotImplementedError

    def state_dict(self) -> dict[str, Any]:
        """The feature standardisation (empty when there is none), saved in checkpoints."""
        if self.scaling is None:
            return {}
        return {"feature_scaling": self.scaling.to_state()}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore a checkpoint's standardisation, also in the datasets already set up.
        Raises `DataError` when it was fitted on features of another size."""
        saved = state_dict.get("feature_scaling")
        if saved is None:
            return
        scaling = FeatureScaling.from_state(saved)
        size = self.scaled_size()
        if scaling.mean.shape != (size,):
            raise DataError(
                f"the checkpoint standardises instances of {scaling.mean.size} values but the "
                f"data's instances hold {size}: use the data settings the model was trained with"
            )
        self.scaling = scaling
        self.use_scaling(scaling)
