"""A PatientBagDataModule on synthetic patients, generated on first use: the built-in default."""

from __future__ import annotations

import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lympho_mil.arguments import as_settings
from lympho_mil.data.datamodule import PatientBagDataModule
from lympho_mil.data.image_cache import default_cache_dir
from lympho_mil.data.synthetic import make_synthetic_dlmi

DEFAULT_MIN_CELLS = 16  # make_synthetic_dlmi's; lowered to max_cells when that is smaller


def ensure_synthetic_dlmi(
    root: str | Path,
    n_patients: int,
    image_size: int,
    seed: int,
    max_cells: int,
    clinical_overlap: float = 0.0,
) -> Path:
    """Write the synthetic dataset into ``root`` unless it is already complete there.

    The data is written into a temporary sibling folder and renamed into place, so an
    interrupted generation never leaves a half-written dataset behind.
    """
    root = Path(root).expanduser()
    if (root / "clinical_annotation.csv").is_file():
        return root
    root.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=root.parent, prefix=f".{root.name}."))
    try:
        make_synthetic_dlmi(
            tmp,
            n_patients,
            image_size,
            seed,
            min_cells=min(DEFAULT_MIN_CELLS, max_cells),
            max_cells=max_cells,
            clinical_overlap=clinical_overlap,
            overwrite=True,
        )
        tmp.rename(root)
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True)
        if not (root / "clinical_annotation.csv").is_file():
            raise
        # another process (a DDP rank, a parallel run) put the same dataset in place first
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return root


@dataclass(frozen=True)
class SyntheticSettings:
    """What `make_synthetic_dlmi` generates (``synthetic:`` of `SyntheticDataModule`'s config).

    n_patients: labelled and unlabelled patients together.
    image_size: side of the generated crops, in pixels (the models read them at the
        datamodule's ``crops.image_size``).
    seed: seed of the generator.
    max_cells: crops of the largest patient.
    clinical_overlap: how much the clinical vector of the two classes overlaps (0: as the
        generator's default cohort).
    """

    n_patients: int = 120
    image_size: int = 64
    seed: int = 0
    max_cells: int = 60
    clinical_overlap: float = 0.0

    def folder_name(self) -> str:
        """The default folder of this dataset under ``<cache>/synthetic/``."""
        name = f"n{self.n_patients}-px{self.image_size}-cells{self.max_cells}-seed{self.seed}"
        return f"{name}-overlap{self.clinical_overlap:g}" if self.clinical_overlap else name


class SyntheticDataModule(PatientBagDataModule):
    """Synthetic blood-smear patients in the DLMI layout, generated once into a cache folder.

    Args:
        root: where the dataset lives (default: ``<cache>/synthetic/n<N>-px<S>-cells<C>-seed<K>``,
            with ``-overlap<Q>`` when ``clinical_overlap`` is not 0); generated there if absent,
            reused otherwise.
        synthetic: the generator's settings (`SyntheticSettings`; see
            `lympho_mil.data.synthetic.make_synthetic_dlmi`).
        **kwargs: everything `PatientBagDataModule` takes (crops, splits, loaders, ...).
    """

    def __init__(
        self,
        root: str | None = None,
        synthetic: SyntheticSettings = SyntheticSettings(),
        **kwargs: Any,
    ) -> None:
        generator = as_settings(SyntheticSettings, synthetic)
        if root is None:
            root = str(default_cache_dir() / "synthetic" / generator.folder_name())
        super().__init__(root=root, **kwargs)  # checks the settings before any file is written
        ensure_synthetic_dlmi(
            root,
            generator.n_patients,
            generator.image_size,
            generator.seed,
            generator.max_cells,
            generator.clinical_overlap,
        )
