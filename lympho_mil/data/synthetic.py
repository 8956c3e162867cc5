"""Synthetic blood-smear data in the layout of the DLMI lymphocytosis challenge (2024 edition).

Each patient gets a smear: a cream background with pale pink red cells and a few platelets,
drawn once in optical-density space and stained with a patient-specific palette. Each crop is
a window of that smear with one lymphocyte drawn at its centre. Tumoral patients carry a
patient-specific fraction (uniform in [0.2, 0.7]) of abnormal lymphocytes, reactive patients
0 to 5 %. The abnormal kinds are cleaved (a notch and cleft cut into the nucleus), smudge
(large, pale, fuzzy nucleus without a cytoplasm rim) and nucleolus (larger, paler nucleus with
pale nucleoli). Clinical values overlap between the classes as in the real data. Every cell's
flag is written to ``ground_truth.csv`` (with the test labels) so attention can be scored.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from datetime import date, timedelta
from pathlib import Path

import numpy as np
from PIL import Image

ABNORMAL_KINDS = ("cleaved", "smudge", "nucleolus")
OUTPUTS = ("clinical_annotation.csv", "ground_truth.csv", "trainset", "testset")
_COLUMNS = "ID,LABEL,GENDER,DOB,LYMPH_COUNT"

# Optical densities (-ln(colour / background)) per RGB channel, fitted to real crops.
_RBC_OD = np.array([0.3, 0.4, 0.19], np.float32)
_PLATELET_OD = np.array([0.9, 1.3, 0.45], np.float32)
_NUCLEUS_OD = np.array([1.05, 1.7, 0.46], np.float32)
_CYTOPLASM_OD = np.array([0.22, 0.17, -0.07], np.float32)
_NUCLEOLUS_OD = np.array([0.4, 0.45, 0.06], np.float32)
_BACKGROUND = np.array([254.0, 231.0, 205.0], np.float32)


@dataclass
class _Patient:
    pid: str
    label: int
    test: bool
    gender: str
    dob: str
    lymph_count: str
    n_cells: int
    abnormal_fraction: float
    kind_weights: np.ndarray


@dataclass
class _Smear:
    """A patient's smear (optical density and RGB, three crops square) and stain palette."""

    od: np.ndarray
    rgb: np.ndarray
    background: np.ndarray
    nucleus: np.ndarray
    cytoplasm: np.ndarray
    nucleolus: np.ndarray


def _gaussian_field(
    rng: np.random.Generator, shape: tuple[int, int], sigma_y: float, sigma_x: float
) -> np.ndarray:
    """Periodic white noise smoothed by a Gaussian (``sigma`` in pixels), unit variance."""
    noise = rng.standard_normal(shape)
    fy = np.fft.fftfreq(shape[0])[:, None] * sigma_y
    fx = np.fft.rfftfreq(shape[1])[None, :] * sigma_x
    kernel = np.exp(-2.0 * np.pi**2 * (fx**2 + fy**2))
    field = np.fft.irfft2(np.fft.rfft2(noise) * kernel, s=shape)
    return (field / field.std()).astype(np.float32)


def _soft(edge: np.ndarray, width: float) -> np.ndarray:
    """Anti-aliased coverage from a signed distance in pixels (positive inside)."""
    return np.clip(edge * (1.0 / width) + 0.5, 0.0, 1.0)


def _disc(
    radius: float, profile: bool, edge: float, aspect: float = 1.0, angle: float = 0.0
) -> np.ndarray:
    """A sprite: a red cell's relative density (biconcave, pale centre) or a flat disc."""
    h = int(np.ceil(radius * aspect + 2))
    ax = np.arange(-h, h + 1, dtype=np.float64)
    y, x = ax[:, None], ax[None, :]
    along, across = x * np.cos(angle) + y * np.sin(angle), y * np.cos(angle) - x * np.sin(angle)
    u = np.sqrt((along / aspect) ** 2 + (across * aspect) ** 2) / radius
    density = _soft((1.0 - u) * radius, edge)
    if profile:
        ring = 0.3 * np.exp(-(((u - 0.8) / 0.17) ** 2))
        density *= 0.8 + ring - 0.6 * np.exp(-((u / 0.4) ** 2))
    return density.astype(np.float32)


class _Renderer:
    """Draws smears and lymphocyte crops of one size; the texture pools serve all patients."""

    def __init__(self, size: int, rng: np.random.Generator) -> None:
        self.size = size
        self.px = size / 224.0  # one pixel of the real 224 px crops
        self.half = int(0.47 * size)
        ax = np.arange(-self.half, self.half + 1, dtype=np.float32)
        self.dy, self.dx = np.meshgrid(ax, ax, indexing="ij")
        self.rho = np.sqrt(self.dx**2 + self.dy**2)
        theta = np.arctan2(self.dy, self.dx)
        self.harmonics = np.stack(
            [f(k * theta) for k in range(2, 6) for f in (np.cos, np.sin)], axis=-1
        ).astype(np.float32)
        pool = 4 * size
        self.coarse = _gaussian_field(rng, (pool, pool), 2.6 * self.px, 2.6 * self.px)
        self.fine = _gaussian_field(rng, (pool, pool), 1.0 * self.px, 1.0 * self.px)
        self.streaks = _gaussian_field(rng, (pool, pool), 2.0 * self.px, 5.0 * self.px)
        self.noise = 3.0 * rng.standard_normal((pool, pool, 3), dtype=np.float32)
        edge = 1.3 * self.px + 0.5
        self.rbc_sprites = [
            _disc(rng.uniform(21, 27) * self.px, True, edge, rng.uniform(1, 1.12), angle)
            for angle in rng.uniform(0, np.pi, 16)
        ]
        self.platelet = _disc(max(3.0 * self.px, 1.2), False, 1.0)

    def smear(self, rng: np.random.Generator) -> _Smear:
        """A patient's smear: red cells by random sequential adsorption, platelets, stain."""
        side = 3 * self.size
        margin = max(s.shape[0] for s in self.rbc_sprites)
        span = side + margin
        rbc_radius = 24.0 * self.px
        n_rbc = int(span**2 / (np.pi * rbc_radius**2) * rng.uniform(0.5, 0.75))
        y, x = rng.uniform(0, span, (2, 3 * n_rbc, 1)).astype(np.float32)
        min_dist = rng.uniform(1.4, 1.7) * rbc_radius
        close = (y - y.T) ** 2 + (x - x.T) ** 2 < min_dist**2
        keep = np.zeros(len(y), bool)
        for i in range(len(y)):
            keep[i] = not close[i, keep].any()
        canvas = np.zeros((span + margin, span + margin), np.float32)
        dots = np.zeros_like(canvas)
        kept = np.flatnonzero(keep)
        sprites = rng.integers(len(self.rbc_sprites), size=len(kept))
        gains = rng.uniform(0.85, 1.15, len(kept)).astype(np.float32)
        for row, sprite, gain in zip(kept, sprites, gains, strict=True):
            top, left = int(y[row, 0]), int(x[row, 0])
            k = self.rbc_sprites[sprite].shape[0]
            canvas[top : top + k, left : left + k] += gain * self.rbc_sprites[sprite]
        k = self.platelet.shape[0]
        for p_top, p_left in rng.integers(0, span, (rng.poisson(25), 2)):
            dots[p_top : p_top + k, p_left : p_left + k] += self.platelet
        inner = slice(margin, margin + side)
        rbc_od = _RBC_OD * rng.normal(1.0, 0.06, 3).astype(np.float32) * rng.uniform(0.85, 1.15)
        od = canvas[inner, inner, None] * rbc_od + dots[inner, inner, None] * _PLATELET_OD
        background = _BACKGROUND + rng.normal(0.0, 3.0, 3).astype(np.float32)
        stain = rng.normal(1.0, 0.06, 3).astype(np.float32) * rng.uniform(0.9, 1.1)
        return _Smear(
            od=od,
            rgb=background * np.exp(-od),
            background=background,
            nucleus=_NUCLEUS_OD * stain,
            cytoplasm=_CYTOPLASM_OD * rng.normal(1.0, 0.06, 3).astype(np.float32),
            nucleolus=_NUCLEOLUS_OD * stain,
        )

    def _window(self, rng: np.random.Generator, pool: np.ndarray, n: int) -> np.ndarray:
        y, x = rng.integers(0, pool.shape[0] - n, 2)
        return pool[y : y + n, x : x + n]

    def cell(self, rng: np.random.Generator, smear: _Smear, kind: str) -> Image.Image:
        """One RGB crop: a smear window with a lymphocyte of ``kind`` at its centre."""
        s, px = self.size, self.px
        aa = max(1.2 * px, 0.6)  # anti-aliasing width of sharp edges
        radius = rng.uniform(29.0, 37.0) * px
        nucleus_od = smear.nucleus * rng.uniform(0.92, 1.08)
        texture = [(0.16, self.coarse), (0.1, self.fine)]
        edge, rim, ellipse, rough = aa, 0.25, 0.1, 0.025
        cyto_scale = rng.uniform(1.06, 1.3)
        if kind == "cleaved":
            radius *= rng.uniform(1.05, 1.2)
        elif kind == "smudge":
            radius *= rng.uniform(1.35, 1.65)
            nucleus_od = nucleus_od * rng.uniform(0.3, 0.45)
            texture = [(0.2, self.streaks), (0.15, self.coarse)]
            edge, rim, ellipse, rough, cyto_scale = 0.3 * radius, 0.0, 0.22, 0.05, 0.0
        elif kind == "nucleolus":
            radius *= rng.uniform(1.25, 1.45)
            nucleus_od = nucleus_od * rng.uniform(0.68, 0.8)
            texture = [(0.05, self.coarse), (0.12, self.fine)]
            cyto_scale = rng.uniform(1.12, 1.3)

        # Only the box that holds the cell is drawn (bounds from the outline amplitudes).
        extent = max(
            (1.0 + ellipse + 3 * rough) * radius + edge, (2.2 * cyto_scale - 1.05) * radius
        )
        h = min(self.half, int(np.ceil(extent + 2.0 * px + 1.0)))
        n, inner = 2 * h + 1, slice(self.half - h, self.half + h + 1)
        dx, dy, rho = self.dx[inner, inner], self.dy[inner, inner], self.rho[inner, inner]
        harmonics = self.harmonics[inner, inner]

        def outline(r: float, ellipse: float, rough: float) -> np.ndarray:
            """A radius per pixel: an ellipse plus harmonics 3 to 5."""
            amp = np.r_[rng.uniform(0.3, 1.0) * ellipse, rng.uniform(0.0, rough, 3)]
            phase = rng.uniform(0, 2 * np.pi, 4)
            w = np.stack([amp * np.cos(phase), -amp * np.sin(phase)], axis=-1).ravel()
            return r * (1.0 + harmonics @ w.astype(np.float32))

        inside = outline(radius, ellipse, rough) - rho
        a_nuc = _soft(inside, edge)
        density = 1.0 + sum(amp * self._window(rng, pool, n) for amp, pool in texture)
        if rim:  # darker chromatin just inside the nuclear membrane
            density += rim * np.exp(-((inside * (1.0 / (3.0 * px))) ** 2))
        if kind == "cleaved":
            phi = rng.uniform(0, 2 * np.pi)
            c, si = np.cos(phi), np.sin(phi)
            along, across = dx * c + dy * si, dy * c - dx * si
            bite = rng.uniform(0.35, 0.5) * radius
            a_bite = _soft(bite - np.sqrt((along - radius) ** 2 + across**2), aa)
            depth = rng.uniform(0.1, 0.4) * radius
            cleft = _soft(1.8 * px - np.abs(across), aa) * _soft(along - depth, aa)
            a_nuc *= 1.0 - np.maximum(a_bite, cleft)
        if kind == "nucleolus":
            pale = np.zeros_like(a_nuc)
            for _ in range(rng.integers(1, 3)):
                d, ang = rng.uniform(0, 0.45) * radius, rng.uniform(0, 2 * np.pi)
                rr = np.sqrt((dx - d * np.cos(ang)) ** 2 + (dy - d * np.sin(ang)) ** 2)
                pale = np.maximum(pale, _soft(rng.uniform(0.16, 0.24) * radius - rr, aa))
            density *= 1.0 - pale
            cell_od = (a_nuc * density)[..., None] * nucleus_od
            cell_od += (a_nuc * pale)[..., None] * smear.nucleolus
        else:
            cell_od = (a_nuc * density)[..., None] * nucleus_od

        a_cell = a_nuc
        if cyto_scale:
            shift = (cyto_scale - 1.05) * radius * rng.uniform(0, 1)
            ang = rng.uniform(0, 2 * np.pi)
            rho_c = np.sqrt((dx - shift * np.cos(ang)) ** 2 + (dy - shift * np.sin(ang)) ** 2)
            a_cyto = _soft(outline(cyto_scale * radius, 0.1, 0.03) - rho_c, aa)
            a_cell = np.maximum(a_cyto, a_nuc)
            cell_od += (a_cyto * (1.0 - a_nuc))[..., None] * smear.cytoplasm

        # The crop's top-left corner in the smear, then the box's within the crop.
        y0, x0 = rng.integers(0, smear.od.shape[0] - s, 2)
        by, bx = s // 2 - h + rng.integers(-s // 40, s // 40 + 1, 2)
        box = (slice(y0 + by, y0 + by + n), slice(x0 + bx, x0 + bx + n))
        od = smear.od[box] * (1.0 - a_cell)[..., None] + cell_od
        rgb = smear.rgb[y0 : y0 + s, x0 : x0 + s] + self._window(rng, self.noise, s)
        rgb[by : by + n, bx : bx + n] += smear.background * np.exp(-od) - smear.rgb[box]
        crop = Image.fromarray(np.clip(rgb, 0, 255, out=rgb).astype(np.uint8))
        for flip in (Image.Transpose.FLIP_TOP_BOTTOM, Image.Transpose.TRANSPOSE):
            if rng.random() < 0.5:
                crop = crop.transpose(flip)
        return crop


def _dob(birth: date, dash: bool) -> str:
    if dash:
        return birth.strftime("%d-%m-%Y")
    return f"{birth.month}/{birth.day}/{birth.year}"


def _patients(
    rng: np.random.Generator,
    n_patients: int,
    test_fraction: float,
    min_cells: int,
    max_cells: int,
    tumoral_fraction: float,
    reference: date,
    clinical_overlap: float = 0.0,
) -> list[_Patient]:
    """Labels, split, clinical values and bag composition, in a shuffled order.

    With ``clinical_overlap`` > 0, that share of patients draws its clinical values from a
    class picked at random (tumoral with probability ``tumoral_fraction``) instead of its own;
    their crops keep their own class. At 0 no extra random numbers are drawn.
    """
    n_tumoral = min(max(round(tumoral_fraction * n_patients), 1), n_patients - 1)
    labels = np.r_[np.ones(n_tumoral, int), np.zeros(n_patients - n_tumoral, int)]
    test = np.zeros(n_patients, bool)
    for cls, n_class in ((1, n_tumoral), (0, n_patients - n_tumoral)):
        n_test = min(round(test_fraction * n_class), n_class - 1)
        test[np.flatnonzero(labels == cls)[:n_test]] = True
    order = rng.permutation(n_patients)
    labels, test = labels[order], test[order]
    ids = rng.choice(2 * n_patients, n_patients, replace=False)
    dash = np.zeros(n_patients, bool)
    dash[rng.choice(n_patients, max(1, round(0.15 * n_patients)), replace=False)] = True

    patients = []
    for i, label in enumerate(labels):
        clinical_class = label
        if clinical_overlap and rng.random() < clinical_overlap:
            clinical_class = int(rng.random() < tumoral_fraction)
        if clinical_class:
            age = rng.normal(72.0, 11.0)
            count = np.exp(rng.normal(np.log(15.0), 1.1))
            male = rng.random() < 0.6
        else:
            age = rng.normal(55.0, 18.0)
            count = rng.uniform(4.0, 8.0)
            male = rng.random() < 0.5
        if label:
            fill = rng.beta(2.5, 1.5)
            fraction = rng.uniform(0.2, 0.7)
        else:
            fill = rng.beta(1.5, 2.5)
            fraction = rng.uniform(0.0, 0.05)
        days = round(float(np.clip(age, 20.0, 100.0)) * 365.25)
        decimals = 1 if rng.random() < 0.3 else 2
        patients.append(
            _Patient(
                pid=f"P{ids[i]}",
                label=int(label),
                test=bool(test[i]),
                gender="M" if male else "F",
                dob=_dob(reference - timedelta(days=days), bool(dash[i])),
                lymph_count=str(round(float(np.clip(count, 2.0, 300.0)), decimals)),
                n_cells=min_cells + round(fill * (max_cells - min_cells)),
                abnormal_fraction=float(fraction),
                kind_weights=rng.dirichlet(np.ones(len(ABNORMAL_KINDS))),
            )
        )
    return patients


def _prepare_root(root: Path, overwrite: bool) -> None:
    if root.exists() and any(root.iterdir()):
        if not overwrite:
            raise FileExistsError(f"{root} is not empty; pass overwrite=True to replace it")
        for name in OUTPUTS:
            path = root / name
            if path.is_dir() and not path.is_symlink():
                shutil.rmtree(path)
            elif path.exists() or path.is_symlink():
                path.unlink()
    root.mkdir(parents=True, exist_ok=True)


def make_synthetic_dlmi(
    root: str | Path,
    n_patients: int = 60,
    image_size: int = 224,
    seed: int = 0,
    *,
    test_fraction: float = 0.2,
    min_cells: int = 16,
    max_cells: int = 80,
    tumoral_fraction: float = 0.65,
    jpeg_quality: int = 90,
    reference_date: str = "2020-01-01",
    clinical_overlap: float = 0.0,
    overwrite: bool = False,
) -> Path:
    """Write a synthetic dataset in the DLMI 2024 layout under ``root`` and return ``root``.

    Writes ``clinical_annotation.csv`` (all patients, unnamed index column),
    ``trainset/trainset_true.csv`` and ``trainset/<ID>/000000.jpg ...`` for labelled patients,
    ``testset/testset_data.csv`` and ``testset/<ID>/...`` for test patients (``LABEL`` -1 in
    every csv), and ``ground_truth.csv`` with columns ``ID,file,abnormal,kind,label,split``
    (every crop, with the true labels of test patients too). Ages are taken at
    ``reference_date``. The same arguments give byte-identical files.

    ``clinical_overlap`` in [0, 1] weakens the clinical signal independently of the crops: that
    share of patients gets the clinical values of a class drawn at random (tumoral with
    probability ``tumoral_fraction``), so the classes' clinical distributions overlap more and
    the two modalities stay independent given the label. 0 (the default) leaves every output
    unchanged; 1 makes the clinical vector carry no information.

    Args:
        root: output folder (created if needed).
        n_patients: number of patients (>= 2), labelled and test together.
        image_size: side of the square crops in pixels (>= 16).
        seed: seed of everything drawn.
        test_fraction: share of each class put in ``testset/`` with ``LABEL`` -1, in [0, 1).
        min_cells, max_cells: range of the number of crops per patient.
        tumoral_fraction: share of tumoral patients, in (0, 1).
        jpeg_quality: JPEG quality of the crops, 1 to 100.
        reference_date: ISO date at which ages are computed.
        clinical_overlap: see above, in [0, 1].
        overwrite: replace the outputs of an earlier call in a non-empty ``root``.

    Raises:
        FileExistsError: ``root`` is not empty and ``overwrite`` is False. With ``overwrite``,
            only the paths this function writes are removed first.
        ValueError: an argument is out of range.
    """
    if n_patients < 2:
        raise ValueError(f"n_patients must be at least 2, got {n_patients}")
    if image_size < 16:
        raise ValueError(f"image_size must be at least 16, got {image_size}")
    if not 0.0 <= test_fraction < 1.0:
        raise ValueError(f"test_fraction must be in [0, 1), got {test_fraction}")
    if not 1 <= min_cells <= max_cells:
        raise ValueError(f"need 1 <= min_cells <= max_cells, got {min_cells}, {max_cells}")
    if not 0.0 < tumoral_fraction < 1.0:
        raise ValueError(f"tumoral_fraction must be in (0, 1), got {tumoral_fraction}")
    if not 0.0 <= clinical_overlap <= 1.0:
        raise ValueError(f"clinical_overlap must be in [0, 1], got {clinical_overlap}")
    if not 1 <= jpeg_quality <= 100:
        raise ValueError(f"jpeg_quality must be in [1, 100], got {jpeg_quality}")
    reference = date.fromisoformat(reference_date)
    root = Path(root)
    _prepare_root(root, overwrite)

    seeds = np.random.SeedSequence(seed).spawn(n_patients + 2)
    patients = _patients(
        np.random.default_rng(seeds[0]),
        n_patients,
        test_fraction,
        min_cells,
        max_cells,
        tumoral_fraction,
        reference,
        clinical_overlap,
    )
    renderer = _Renderer(image_size, np.random.default_rng(seeds[1]))

    def row(p: _Patient, label: int) -> str:
        return f"{p.pid},{label},{p.gender},{p.dob},{p.lymph_count}\n"

    clinical, truth = [f",{_COLUMNS}\n"], ["ID,file,abnormal,kind,label,split\n"]
    tables = {"trainset": [f"{_COLUMNS}\n"], "testset": [f"{_COLUMNS}\n"]}
    for i, (p, child) in enumerate(zip(patients, seeds[2:], strict=True)):
        split = "testset" if p.test else "trainset"
        shown = -1 if p.test else p.label
        clinical.append(f"{i},{row(p, shown)}")
        tables[split].append(row(p, shown))
        rng = np.random.default_rng(child)
        smear = renderer.smear(rng)
        folder = root / split / p.pid
        folder.mkdir(parents=True)
        abnormal = rng.random(p.n_cells) < p.abnormal_fraction
        kinds = rng.choice(len(ABNORMAL_KINDS), p.n_cells, p=p.kind_weights)
        for j in range(p.n_cells):
            kind = ABNORMAL_KINDS[kinds[j]] if abnormal[j] else "normal"
            name = f"{j:06d}.jpg"
            renderer.cell(rng, smear, kind).save(folder / name, quality=jpeg_quality)
            truth.append(f"{p.pid},{name},{int(abnormal[j])},{kind},{p.label},{split}\n")

    (root / "clinical_annotation.csv").write_text("".join(clinical))
    (root / "trainset" / "trainset_true.csv").write_text("".join(tables["trainset"]))
    (root / "testset").mkdir(exist_ok=True)
    (root / "testset" / "testset_data.csv").write_text("".join(tables["testset"]))
    (root / "ground_truth.csv").write_text("".join(truth))
    return root
