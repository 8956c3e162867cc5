"""``lympho-mil pretrain``: a config's crop encoder pretrained with SimCLR (or DINO) on the
crops of one or more DLMI folders, written where the config's features read it; then ``fit``
with the same config extracts its features with those weights."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from lympho_mil.cli import main
from lympho_mil.cli.app import build_cli
from lympho_mil.data import CropSettings
from lympho_mil.data.synthetic import make_synthetic_dlmi
from lympho_mil.features import folder_crops

CONFIGS = Path(__file__).resolve().parents[1] / "examples" / "configs"
SSL_CONFIG = str(CONFIGS / "dlmi_images_ssl.yaml")
WEIGHTS = Path("encoders/simclr_stain_small_cnn_w32_64px.pt")  # the config's, relative to the cwd
TINY = [  # 32 px synthetic crops, two short epochs in batches of 16
    "--data.crops={image_size: 32, center_crop: null}",
    "--pretrain.settings.epochs=2",
    "--pretrain.settings.warmup_epochs=0",
    "--pretrain.settings.batch_size=16",
]


@pytest.fixture
def work(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A private working directory, where the config's relative weights path is written."""
    monkeypatch.chdir(tmp_path)
    return tmp_path


def pretrain(root: Path, *more: str) -> None:
    main(["pretrain", "--config", SSL_CONFIG, f"--data.root={root}", *TINY, *more])


def refused(capsys: pytest.CaptureFixture[str], *args: str) -> str:
    """The one-line error of a pretrain that must exit 2 (after any progress lines)."""
    with pytest.raises(SystemExit) as exc:
        main(["pretrain", *args])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    (line,) = (x for x in err.splitlines() if x.startswith("lympho-mil: error: "))
    return line


def test_pretrain_writes_the_configs_weights_and_fit_extracts_with_them(
    synthetic_dlmi: Path, work: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    more = make_synthetic_dlmi(work / "more", n_patients=4, image_size=32, seed=5)
    pretrain(synthetic_dlmi, f"--pretrain.extra_roots=[{more}]")
    first = capsys.readouterr().out
    crops = sum(1 for r in (synthetic_dlmi, more) for _ in r.rglob("*.jpg"))
    assert f"encoder pretrained on {crops} crops of 2 folder(s)" in first
    assert first.rstrip().endswith(f"-> {WEIGHTS}")
    written = WEIGHTS.read_bytes()

    pretrain(synthetic_dlmi, f"--pretrain.extra_roots=[{more}]")  # cached: the same file
    assert "encoder loaded from the cache, pretrained earlier on" in capsys.readouterr().out
    assert WEIGHTS.read_bytes() == written

    args = ["--config", SSL_CONFIG, f"--data.root={synthetic_dlmi}", TINY[0]]
    tiny = ["--trainer.fast_dev_run=true", "--data.loader.num_workers=0"]
    cli = build_cli([*args, *tiny], run=False)
    cli.trainer.fit(cli.model, datamodule=cli.datamodule)
    state = torch.load(WEIGHTS, weights_only=True)
    extractor = cli.datamodule.extractor.state_dict()
    assert state.keys() == extractor.keys()
    assert all(torch.equal(state[k], extractor[k]) for k in state)
    assert cli.trainer.global_step == 1


def test_pretrain_keeps_other_weights_unless_told(
    synthetic_dlmi: Path, work: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = work / "elsewhere" / "encoder.pt"
    pretrain(synthetic_dlmi, f"--pretrain.out={out}")
    assert f"fit with it: --data.features.weights {out}" in capsys.readouterr().out
    before = out.read_bytes()
    again = [SSL_CONFIG, f"--data.root={synthetic_dlmi}", *TINY, f"--pretrain.out={out}"]
    line = refused(capsys, "--config", *again, "--pretrain.settings.seed=1")
    assert "holds other weights" in line and "--pretrain.overwrite true" in line
    assert "pretraining the crop encoder" not in capsys.readouterr().err  # refused first
    assert out.read_bytes() == before
    pretrain(synthetic_dlmi, f"--pretrain.out={out}", "--pretrain.settings.seed=1",
             "--pretrain.overwrite=true")  # fmt: skip
    assert out.read_bytes() != before


def test_pretrain_with_dino_caches_another_encoder(
    synthetic_dlmi: Path, work: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """``--pretrain.settings.method dino``: its own cached encoder, whose sidecar says DINO."""
    pretrain(synthetic_dlmi)
    simclr = WEIGHTS.read_bytes()
    pretrain(synthetic_dlmi, "--pretrain.settings.method=dino", "--pretrain.overwrite=true")
    out = capsys.readouterr().out
    assert "encoder pretrained on" in out  # not the SimCLR encoder from the cache
    assert WEIGHTS.read_bytes() != simclr
    cached = Path(out.split("cached as ")[-1].split(")")[0])
    assert '"method": "dino"' in cached.with_suffix(".json").read_text()


def test_pretrain_pairs_crops_of_one_patient_when_told(
    synthetic_dlmi: Path, work: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """``--pretrain.settings.patient_pairs``: another encoder, trained on pairs drawn within
    the folder's patients (`folder_crops` gives each crop's patient)."""
    pretrain(synthetic_dlmi)
    simclr = WEIGHTS.read_bytes()
    pretrain(synthetic_dlmi, "--pretrain.settings.patient_pairs=1.0", "--pretrain.overwrite=true")
    out = capsys.readouterr().out
    assert WEIGHTS.read_bytes() != simclr
    cached = Path(out.split("cached as ")[-1].split(")")[0])
    assert '"patient_pairs": 1.0' in cached.with_suffix(".json").read_text()
    arrays, patients = folder_crops([synthetic_dlmi], CropSettings(image_size=32))
    bags = sorted(p for p in synthetic_dlmi.glob("*set/*") if p.is_dir())  # train and test
    files = sorted(len(list(bag.glob("*.jpg"))) for bag in bags)
    assert len(arrays[0]) == len(patients[0])
    assert sorted(np.bincount(patients[0])) == files  # each patient's crops, all of them


def test_pretrain_refuses_what_it_cannot_train(
    synthetic_dlmi: Path, work: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    recipe = str(CONFIGS / "dlmi.yaml")
    line = refused(capsys, "--config", recipe, f"--data.root={synthetic_dlmi}")
    assert "small_cnn" in line and "'morphology'" in line
    line = refused(capsys, "--config", SSL_CONFIG)
    assert "--data.root" in line
    shape = "--pretrain.settings.width=16"
    line = refused(capsys, "--config", SSL_CONFIG, f"--data.root={synthetic_dlmi}", shape)
    assert "'width': 32" in line and "{'width': 16}" in line
    method = "--pretrain.settings.method=byol"
    line = refused(capsys, "--config", SSL_CONFIG, f"--data.root={synthetic_dlmi}", method)
    assert "method must be one of ('simclr', 'dino')" in line
    nowhere = f"--pretrain.extra_roots=[{work / 'nowhere'}]"
    line = refused(capsys, "--config", SSL_CONFIG, f"--data.root={synthetic_dlmi}", nowhere)
    assert f"--pretrain.extra_roots: no folder {work / 'nowhere'}" in line
    if not torch.cuda.is_available():
        gpu = "--pretrain.device=cuda"
        line = refused(capsys, "--config", SSL_CONFIG, f"--data.root={synthetic_dlmi}", gpu)
        assert "no CUDA GPU here" in line
    assert not WEIGHTS.exists()
