"""The benchmark harness (benchmarks/): its entry point, its records and the docs tables."""

from __future__ import annotations

import importlib
import importlib.util
import json
import re
import runpy
import sys
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np
import pytest

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


@pytest.fixture
def harness(monkeypatch: pytest.MonkeyPatch) -> ModuleType:
    """``benchmarks/harness.py``, importable by the study modules as ``harness``."""
    monkeypatch.syspath_prepend(str(BENCHMARKS))
    return importlib.import_module("harness")


def load_tables() -> ModuleType:
    """``benchmarks/tables.py`` under a name no installed package has."""
    spec = importlib.util.spec_from_file_location("benchmark_tables", BENCHMARKS / "tables.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def registered_in_sources() -> set[str]:
    """The study names that the ``study_*`` modules register, read from their source."""
    pattern = re.compile(r'@study\(\s*"([^"]+)"')
    return {n for p in BENCHMARKS.glob("study_*.py") for n in pattern.findall(p.read_text())}


def test_entry_point_lists_every_registered_study(
    harness: ModuleType, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """``python benchmarks/run.py --help`` (run in this process) names every study of every
    ``study_*`` module, the speed, MIL, synthetic and DLMI ones among them."""
    monkeypatch.setattr(sys, "argv", ["run.py", "--help"])
    with pytest.raises(SystemExit) as exit_info:
        runpy.run_path(str(BENCHMARKS / "run.py"), run_name="__main__")
    assert exit_info.value.code == 0
    out, err = capsys.readouterr()
    assert "left out" not in err  # every study module imports here
    listed = set(re.findall(r"^ {4}([a-z0-9-]+)", out, flags=re.M))
    names = registered_in_sources()
    assert listed == names == set(harness.STUDIES)
    assert {"loader-throughput", "mil-classic", "fusion-synthetic", "dlmi-round7"} <= names


def test_a_study_run_is_recorded_with_its_command_and_commit(
    harness: ModuleType,
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    def arguments(p):  # type: ignore[no-untyped-def]
        p.add_argument("--n", type=int, default=2)

    def counting(args) -> Iterator[dict]:  # type: ignore[no-untyped-def]
        for i in range(args.n):
            yield {"record": "count", "i": i}

    monkeypatch.setitem(harness.STUDIES, "test-count", harness.Study(counting, "count", arguments))
    monkeypatch.setattr(harness, "RESULTS", tmp_path)
    harness.run(["test-count", "--n", "3", "--record", "counted"])
    printed = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert printed == harness.read_records("counted", tmp_path)
    assert [r["i"] for r in printed] == [0, 1, 2]
    first = printed[0]
    assert first["study"] == "test-count" and first["record"] == "count"
    assert first["command"].endswith("run.py test-count --n 3 --record counted")
    assert first["commit"] and re.fullmatch(r"\d{4}-\d\d-\d\d", first["date"])
    assert {"platform", "cpu_count", "load_avg"} <= first["machine"].keys()
    harness.run(["test-count", "--n", "1", "--record"])  # the study's name by default
    assert len(harness.read_records("test-count", tmp_path)) == 1


def interval(mean: float, low: float, high: float) -> dict[str, float]:
    return {"mean": mean, "std": 0.01, "ci95_low": low, "ci95_high": high}


HEADER = {
    "command": "python benchmarks/run.py dlmi-round7 --repeats 5 --record",
    "commit": "abc1234",
    "date": "2026-12-07",
    "machine": {"load_avg": [2.5, 2.0, 1.9]},
}


def candidate(name: str, ba: float, **minus: tuple[float, float, float]) -> dict:
    return {
        "study": "dlmi-round7",
        "record": "candidate",
        "candidate": name,
        "balanced_accuracy": interval(ba, ba - 0.08, ba + 0.08),
        "auroc": interval(0.9, 0.84, 0.96),
        **{
            f"minus_{ref}": {"balanced_accuracy": interval(*d), "auroc": interval(*d)}
            for ref, d in minus.items()
        },
        "whole_cv_s": 1234.4,
        **HEADER,
    }


@pytest.fixture
def results(tmp_path: Path) -> Path:
    """Fake recorded runs: a DLMI round and a study with two kinds of record."""
    folder = tmp_path / "results"
    folder.mkdir()
    round7 = [
        {"study": "dlmi-round7", "record": "pretraining", "crops": 10019, **HEADER},
        candidate("tabular_mlp", 0.78, fused_morphology_mean=(-0.015, -0.067, 0.036)),
        candidate("fused_morphology_mean", 0.795, tabular_mlp=(0.015, -0.036, 0.067)),
        candidate("images_ssl_mean", 0.7, tabular_mlp=(-0.08, -0.2, 0.04)),
        candidate("fused_ssl_mean", 0.79, tabular_mlp=(0.01, -0.05, 0.07)),
    ]
    other = [
        {"study": "cv-cached", "record": "image_cache", "crops": 6761, "seconds": 7.7},
        {"study": "cv-cached", "record": "cv_cached", "seconds": 18.02, "fold_seconds": [3.3, 3.5]},
    ]
    for name, records in (("dlmi-round7", round7), ("cv-cached", other)):
        text = "".join(json.dumps(r) + "\n" for r in records)
        (folder / f"{name}.jsonl").write_text(text)
    return folder


def test_tables_fill_the_marked_tables_once_and_for_all(results: Path, tmp_path: Path) -> None:
    tables = load_tables()
    doc = tmp_path / "results.md"
    doc.write_text(
        "# Results\n\nBefore; a quoted marker, `<!-- table: x -->`, is prose.\n\n"
        "<!-- table: dlmi-round7 -->\nold text\n<!-- /table -->\n\nBetween.\n\n"
        "<!-- table: dlmi-round7:images -->\n<!-- /table -->\n\n"
        "<!-- table: cv-cached:cv_cached -->\n<!-- /table -->\n"
        "<!-- table: cv-cached::record,seconds -->\n<!-- /table -->\nAfter.\n"
    )
    assert tables.main([str(doc), "--results", str(results)]) == 0
    text = doc.read_text()
    assert "old text" not in text and text.startswith("# Results\n\nBefore; a quoted")
    assert text.endswith("<!-- /table -->\nAfter.\n") and "\n\nBetween.\n\n" in text
    blocks = re.findall(r"<!-- table: (\S+) -->\n(.*?)<!-- /table -->", text, flags=re.S)
    (_, everything), (_, images), (_, cv), (_, chosen) = blocks
    header = "| candidate | balanced accuracy | AUROC | minus `tabular_mlp`: balanced accuracy |"
    assert header in everything
    recipe = "| `fused_morphology_mean` | 0.795 [0.715, 0.875] | 0.900 [0.840, 0.960] |"
    diff = "+0.015 [-0.036, +0.067]"
    assert f"{recipe} {diff} | {diff} |  |  | 1,234 s |" in everything
    assert everything.count("\n| `") == 4  # the pretraining record is not a candidate
    assert images.count("\n| `") == 3  # the references stay beside the image candidates
    assert "`images_ssl_mean`" in images and "`fused_ssl_mean`" not in images
    assert "| seconds | fold seconds |\n| --- | --- |\n| 18.02 | 3.3, 3.5 |" in cv
    assert (
        "| record | seconds |\n| --- | --- |\n| image_cache | 7.7 |\n| cv_cached | 18.02 |"
        in chosen
    )
    made = "`python benchmarks/run.py dlmi-round7 --repeats 5 --record` at commit `abc1234`"
    assert f"{made}, 2026-12-07, load average 2.5." in everything
    assert "benchmarks/results/cv-cached.jsonl" in cv and "arguments not recorded" in cv
    # idempotent: a second run, and a check, find nothing to change
    assert tables.main([str(doc), "--results", str(results)]) == 0
    assert doc.read_text() == text
    assert tables.main([str(doc), "--results", str(results), "--check"]) == 0


def test_tables_check_reports_stale_tables_and_bad_markers(results: Path, tmp_path: Path) -> None:
    tables = load_tables()
    doc = tmp_path / "doc.md"
    doc.write_text("<!-- table: cv-cached:image_cache -->\n| stale |\n<!-- /table -->\n")
    assert tables.main([str(doc), "--results", str(results), "--check"]) == 1
    assert "| stale |" in doc.read_text()  # --check writes nothing
    for bad, message in (
        ("<!-- table: cv-cached -->\nno end\n", "without '<!-- /table -->'"),
        ("<!-- table: nothing-recorded -->\n<!-- /table -->\n", "no recorded run"),
        ("<!-- table: cv-cached:no_such_kind -->\n<!-- /table -->\n", "no view or record kind"),
        ("<!-- table: cv-cached::no_such_field -->\n<!-- /table -->\n", "no field"),
        ("<!-- table: dlmi-round7:images:auroc -->\n<!-- /table -->\n", "has its own columns"),
    ):
        doc.write_text(bad)
        with pytest.raises(SystemExit, match=re.escape(message)):
            tables.main([str(doc), "--results", str(results)])


def test_fusion_study_compares_the_three_models_on_the_same_patients(
    harness: ModuleType, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """``fusion-synthetic`` end to end on a tiny set: morphology features extracted and fed
    to the image models, one record per model, the paired differences of the fusion."""
    importlib.import_module("study_synthetic")
    argv = ["fusion-synthetic", "--patients", "30", "--folds", "2", "--repeats", "1"]
    argv += ["--epochs", "1", "--min-cells", "1", "--max-cells", "2", "--out", str(tmp_path)]
    harness.run(argv)
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert {line["study"] for line in lines} == {"fusion-synthetic"}
    models = [line for line in lines if line["record"] == "model"]
    assert [m["model"] for m in models] == ["TabularMLP", "AttentionMIL", "GatedFusionMIL"]
    assert {m["patients"] for m in models} == {24}  # the labelled 80 %, all in every model
    for m in models:
        assert 0.0 <= m["balanced_accuracy"]["mean"] <= 1.0
    paired = [line["difference"] for line in lines if line["record"] == "paired"]
    assert paired == ["GatedFusionMIL - TabularMLP", "GatedFusionMIL - AttentionMIL"]


# -- the DLMI rounds' candidates ------------------------------------------------------------------
TINY_DATA = [  # a candidate on the tiny synthetic patients: one training step on the CPU
    "--trainer.fast_dev_run=true",
    "--trainer.accelerator=cpu",
    "--data.loader.num_workers=0",
    "--data.max_instances=4",
]


@pytest.fixture(scope="module")
def study_dlmi() -> Iterator[ModuleType]:
    """``benchmarks/study_dlmi.py``, imported as ``python benchmarks/run.py`` imports it."""
    with pytest.MonkeyPatch.context() as patch:
        patch.syspath_prepend(str(BENCHMARKS))
        yield importlib.import_module("study_dlmi")


@pytest.fixture(scope="module")
def round_candidates(study_dlmi: ModuleType, tmp_path_factory: pytest.TempPathFactory) -> dict:
    """Every candidate of the seventh, eighth and tenth to sixteenth rounds (the pretrained
    encoder's weights: a SmallCNN of the pretraining's shape, untrained), by ``r7:``, ``r8:``,
    ... ``r16:`` name."""
    import torch

    from lympho_mil.nn import build_instance_encoder

    settings = study_dlmi.SSL_SETTINGS.encoder_kwargs
    encoder = build_instance_encoder(
        "small_cnn", out_dim=settings["out_dim"], width=settings["width"]
    )
    weights = tmp_path_factory.mktemp("ssl") / "ssl_small_cnn.pt"
    torch.save(encoder.state_dict(), weights)
    rounds = {
        "r7": study_dlmi.round7_candidates(weights),
        "r10": study_dlmi.round10_candidates(weights),
        "r8": study_dlmi.round8_candidates(weights),
        "r11": study_dlmi.round11_candidates(weights),
        "r12": study_dlmi.round12_candidates(weights),
        "r13": study_dlmi.round13_candidates(weights),
        "r14": study_dlmi.round14_candidates(weights),
        "r15": study_dlmi.round15_candidates(weights),
        "r16": study_dlmi.round16_candidates(weights),
    }
    return {
        f"{r}:{name}": config
        for r, candidates in rounds.items()
        for name, config in candidates.items()
    }


def _twins(tag: str, summaries: tuple[str, ...]) -> list[str]:
    return [f"{kind}_{tag}_{summary}" for summary in summaries for kind in ("fused", "images")]


REFERENCES = ["tabular_mlp", "fused_morphology_mean"]
HEADS = ("mean", "statistics", "types")
ROUND_CANDIDATES = [  # the names round7_, round8_ and round10_ to round16_candidates build
    f"{round_name}:{name}"
    for round_name, names in {
        "r7": ["tabular_mlp"] + [n for rep in ("morphology", "cytometry", "ssl")
                                 for n in _twins(rep, HEADS)],
        "r8": REFERENCES + [f"{n}_l2" for rep in ("morphology", "cytometry", "ssl")
                            for n in _twins(rep, ("mean", "statistics"))],
        "r10": REFERENCES + _twins("ssl200", HEADS),
        "r11": REFERENCES + _twins("ssl", ("attention", "gated_attention")),
        "r12": REFERENCES + _twins("ssl_d4", HEADS),
        "r13": [*REFERENCES, "images_ssl_tuned_mean"],
        "r14": REFERENCES + _twins("ssl96", HEADS),
        "r15": REFERENCES + _twins("dino", HEADS),
        "r16": REFERENCES + _twins("ssl_pl", HEADS) + [f"images_ssl_{h}" for h in HEADS],
    }.items()
    for name in names
]  # fmt: skip


def test_the_rounds_build_every_candidate_they_name(round_candidates: dict) -> None:
    assert sorted(round_candidates) == sorted(ROUND_CANDIDATES)
    for name, config in round_candidates.items():  # the encoder reads crops of its size
        if "_ssl" in name:
            size = config["data"]["init_args"]["crops"]["image_size"]
            assert size == (96 if "_ssl96_" in name else 64), name


@pytest.mark.filterwarnings("ignore:`\\w+.configure_optimizers` will be overridden")
@pytest.mark.parametrize("name", ROUND_CANDIDATES)
def test_a_round_candidate_parses_and_trains_one_step(
    name: str,
    round_candidates: dict,
    study_dlmi: ModuleType,
    synthetic_dlmi: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """Each candidate of the seventh, eighth and tenth to sixteenth rounds as the study
    cross-validates it (`with_data`), dumped to a file: ``lympho-mil fit --config FILE
    --print_config`` parses it, and it trains one step on the tiny synthetic patients. The
    eighth round's LightningCLI ``optimizer:`` and ``lr_scheduler:`` sections replace the
    model's own ``optim`` (AdamW and its cosine over the run): Adam with weight decay 0.2, a
    cosine of 60 epochs."""
    import torch
    import yaml

    from lympho_mil.cli import main
    from lympho_mil.cli.app import build_cli
    from lympho_mil.models.schedule import ModelCosine

    cache = tmp_path.parent / "round-candidates-cache"  # features extracted once a kind
    config = study_dlmi.with_data(round_candidates[name], synthetic_dlmi, str(cache))
    path = tmp_path / f"{name.replace(':', '_')}.yaml"
    path.write_text(yaml.safe_dump(config))
    capsys.readouterr()
    with pytest.raises(SystemExit) as exc:
        main(["fit", "--config", str(path), "--print_config"])
    assert exc.value.code in (0, None)
    printed = yaml.safe_load(capsys.readouterr().out)
    declared = config["model"]["class_path"]
    assert printed["model"]["class_path"].endswith(declared)
    l2 = name.endswith("_l2")
    if l2:
        assert printed["optimizer"]["class_path"] == "torch.optim.Adam"
        assert printed["optimizer"]["init_args"]["weight_decay"] == 0.2
        assert printed["lr_scheduler"]["init_args"]["T_max"] == 60

    crops = {**config["data"]["init_args"].get("crops", {}), "image_size": 32}
    crops["center_crop"] = None  # the synthetic crops as they are
    args = ["--config", str(path), f"--data.crops={json.dumps(crops)}", *TINY_DATA]
    cli = build_cli(args, run=False)
    if name.endswith("_tuned_mean"):  # starts from the pretrained weights, and trains them
        saved = torch.load(config["model"]["init_args"]["encoder"]["weights"])
        encoder = cli.model.net.encoder
        assert all(torch.equal(encoder.state_dict()[k], v) for k, v in saved.items())
        assert all(p.requires_grad for p in encoder.parameters())
    teacher = cli.datamodule.split.teacher_confidence  # the sixteenth round's co-training
    assert teacher == (0.9 if "_ssl_pl_" in name else None)
    cli.trainer.fit(cli.model, datamodule=cli.datamodule)
    assert cli.trainer.global_step == 1
    (optimizer,) = cli.trainer.optimizers
    (schedule,) = [c.scheduler for c in cli.trainer.lr_scheduler_configs]
    optim = cli.model.optim
    if l2:
        assert type(optimizer) is torch.optim.Adam and not isinstance(schedule, ModelCosine)
        assert optimizer.param_groups[0]["weight_decay"] == 0.2 and schedule.T_max == 60
    else:
        assert type(optimizer) is torch.optim.AdamW and isinstance(schedule, ModelCosine)
        assert optimizer.param_groups[0]["weight_decay"] == optim.weight_decay
    expected_lr = 0.003  # the recipe's; tabular_mlp's own, the fine-tuning's gentler one:
    expected_lr = 0.01 if name.endswith("tabular_mlp") else expected_lr
    expected_lr = study_dlmi.TUNED_LR if name.endswith("_tuned_mean") else expected_lr
    assert optimizer.param_groups[0]["initial_lr"] == expected_lr == optim.lr


def resolved(config: dict, study_dlmi: ModuleType, root: Path, tmp_path: Path) -> dict:
    """``config`` on ``root`` as the CLI resolves it (every default filled in)."""
    import yaml

    from lympho_mil.cli.app import build_cli

    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(study_dlmi.with_data(config, root, None)))
    cli = build_cli(["--config", str(path)], run=False)
    dumped = yaml.safe_load(cli.parser.dump(cli.config, skip_none=False))
    dumped.pop("config", None)
    return dumped


def test_the_rounds_reference_recipe_is_the_shipped_one(
    round_candidates: dict, study_dlmi: ModuleType, synthetic_dlmi: Path, tmp_path: Path
) -> None:
    """The recipe among the candidates (``fused_morphology_mean``) resolves to the settings of
    ``examples/configs/dlmi.yaml``, and the eighth round's references are the seventh's."""
    recipe = study_dlmi.RECIPE
    args = (study_dlmi, synthetic_dlmi, tmp_path)
    candidate = resolved(round_candidates[f"r7:{recipe}"], *args)
    assert candidate == resolved(study_dlmi.load("dlmi.yaml"), *args)
    for reference in (study_dlmi.REFERENCE, recipe):
        assert round_candidates[f"r8:{reference}"] == round_candidates[f"r7:{reference}"]


def test_the_shipped_image_pathway_is_the_sixteenth_rounds(
    round_candidates: dict, study_dlmi: ModuleType, synthetic_dlmi: Path, tmp_path: Path
) -> None:
    """``examples/configs/dlmi_images_ssl.yaml`` resolves to the sixteenth round's image
    pathway (``images_ssl_pl_types``: the seventh round's with co-training), but for where it
    reads the encoder's weights."""
    import copy

    shipped = study_dlmi.load("dlmi_images_ssl.yaml")
    candidate = copy.deepcopy(round_candidates["r16:images_ssl_pl_types"])
    weights = shipped["data"]["init_args"]["features"]["weights"]
    candidate["data"]["init_args"]["features"]["weights"] = weights
    args = (study_dlmi, synthetic_dlmi, tmp_path)
    assert resolved(candidate, *args) == resolved(shipped, *args)


def test_the_sixteenth_round_reads_both_folders_as_one(
    study_dlmi: ModuleType, synthetic_dlmi: Path, tmp_path: Path
) -> None:
    """`challenge_layout` links the labelled folder's ``trainset/`` and the unlabelled
    folder's ``testset/`` into one DLMI folder; making it again keeps it, another source is
    refused."""
    from lympho_mil.data import read_dlmi

    folder = study_dlmi.challenge_layout(synthetic_dlmi, synthetic_dlmi, tmp_path / "both")
    assert study_dlmi.challenge_layout(synthetic_dlmi, synthetic_dlmi, folder) == folder
    frame, _ = read_dlmi(folder)
    original, _ = read_dlmi(synthetic_dlmi)
    assert frame.drop(columns="source", errors="ignore").equals(
        original.drop(columns="source", errors="ignore")
    )
    other = tmp_path / "other"
    (other / "testset").mkdir(parents=True)
    with pytest.raises(SystemExit, match="points to"):
        study_dlmi.challenge_layout(synthetic_dlmi, other, folder)


def test_the_teacher_record_counts_the_patients_each_fold_adds(
    study_dlmi: ModuleType, synthetic_dlmi: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from lympho_mil.data import read_dlmi

    frame, _ = read_dlmi(synthetic_dlmi)
    ids = sorted(frame.index[frame["label"] >= 0])
    folds = [{"train_ids": ids[:6], "val_ids": ids[6:8], "test_ids": ids[8:]}]
    (tmp_path / "cv_report.json").write_text(json.dumps({"per_fold": folds * 2}))
    monkeypatch.setattr(study_dlmi, "TEACHER_CONFIDENCE", 0.5)  # every unlabelled patient
    record = study_dlmi.teacher_record(synthetic_dlmi, tmp_path)
    unlabelled = int((frame["label"] == -1).sum())
    assert record["unlabelled_patients"] == unlabelled > 0
    assert record["labelled_per_fold"] == {"median": unlabelled, "range": [unlabelled] * 2}
    assert 0 <= record["tumoral_per_fold"]["median"] <= unlabelled


def scored(name: str, balanced_accuracy: float, auroc: float) -> dict:
    """A candidate record with the fields the rounds' rules read."""
    return {
        "record": "candidate",
        "candidate": name,
        "balanced_accuracy": {"mean": balanced_accuracy},
        "auroc": {"mean": auroc},
        "minus_tabular_mlp": {
            "balanced_accuracy": {"mean": balanced_accuracy - 0.78, "ci95_low": -0.01},
            "auroc": {"mean": auroc - 0.90},
        },
    }


def test_image_pathway_prefers_auroc_then_balanced_accuracy_within_0005(
    study_dlmi: ModuleType,
) -> None:
    rows = [
        scored("images_a", 0.70, 0.850),
        scored("images_b", 0.78, 0.846),  # within 0.005 of the top AUROC, better accuracy
        scored("images_c", 0.90, 0.840),  # further away: its accuracy does not count
        scored("fused_a", 0.95, 0.990),  # not image-only
    ]
    assert study_dlmi.image_pathway(rows)["candidate"] == "images_b"
    assert study_dlmi.image_pathway(rows[:1] + rows[2:])["candidate"] == "images_a"


def test_challenge_rule_replaces_the_pathway_and_the_recipe_only_when_beaten(
    study_dlmi: ModuleType,
) -> None:
    before = scored("images_ssl_types", 0.775, 0.850)
    recipe = scored("fused_morphology_mean", 0.806, 0.909)
    better = scored("images_ssl200_types", 0.79, 0.86)
    fused = scored("fused_ssl200_types", 0.83, 0.91)
    summed = scored("sum_ssl200_types", 0.84, 0.92)
    verdict = study_dlmi.challenge_verdict(10, better, before, better, [fused, summed], recipe)
    assert verdict["replaces"] == "images_ssl_types"
    assert verdict["adopted_as_recipe"] == "sum_ssl200_types"  # both win: higher accuracy
    assert verdict["bar_images_auroc_0.85"] and not verdict["bar_images_balanced_accuracy_0.80"]
    assert verdict["bars_sum_ssl200_types"]["bar_fused_auroc_difference_above_0"]

    worse = scored("images_ssl200_mean", 0.80, 0.84)
    level = scored("sum_ssl_types", 0.806, 0.95)  # a tie in accuracy is no win
    lower = scored("fused_ssl_types", 0.90, 0.90)
    verdict = study_dlmi.challenge_verdict(10, worse, before, before, [lower, level], recipe)
    assert verdict["own_pathway"] == "images_ssl200_mean" and verdict["round"] == 10
    assert verdict["image_pathway"] == "images_ssl_types" and verdict["replaces"] is None
    assert verdict["adopted_as_recipe"] is None


def test_a_tie_in_the_last_bits_is_no_win(study_dlmi: ModuleType) -> None:
    """The sixteenth round's logit sum and recipe: the same AUROC (1,591 of 1,750 pairs),
    summed in other orders."""
    before = scored("images_ssl_types", 0.775, 0.850)
    recipe = scored("fused_morphology_mean", 0.8063571428571429, 0.909142857142857)
    level = scored("sum_ssl_pl_types", 0.809, 0.9091428571428573)
    assert level["auroc"]["mean"] > recipe["auroc"]["mean"]  # in float, not in fact
    verdict = study_dlmi.challenge_verdict(16, before, before, before, [level], recipe)
    assert verdict["adopted_as_recipe"] is None
    higher = scored("sum_ssl_pl_types", 0.809, 0.9091428571428573 + 1e-6)
    verdict = study_dlmi.challenge_verdict(16, before, before, before, [higher], recipe)
    assert verdict["adopted_as_recipe"] == "sum_ssl_pl_types"
    at_bar = scored("images_ssl_pl_types", 0.80 - 1e-15, 0.85 - 1e-15)  # on the bars
    bars = study_dlmi.bars(at_bar, level)
    assert bars["bar_images_balanced_accuracy_0.80"] and bars["bar_images_auroc_0.85"]


def test_a_losing_round_is_judged_with_the_standing_pathways_recorded_contenders(
    study_dlmi: ModuleType, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """When a round's own pathway does not beat the seventh round's, `challenge` trains
    nothing more: the standing pathway's fused twin and logit sum are the seventh and ninth
    rounds' records, and the verdict is read from them."""
    import argparse

    rows = [scored("fused_morphology_mean", 0.806, 0.909), scored("images_new_mean", 0.7, 0.8)]

    def no_more_training(*args: object, **kwargs: object) -> None:
        raise AssertionError("nothing should be cross-validated")

    monkeypatch.setattr(study_dlmi, "_rows", lambda *args, **kwargs: rows)
    monkeypatch.setattr(study_dlmi, "_cv", no_more_training)
    monkeypatch.setattr(study_dlmi, "sum_row", no_more_training)
    args = argparse.Namespace(data=tmp_path, cache_dir=None, out=tmp_path, out_seventh=None)
    records = list(study_dlmi.challenge(15, {}, ["images_new_mean"], args))
    recorded = {
        r["candidate"]: r
        for name in ("dlmi-round7", "dlmi-round9")
        for r in study_dlmi.read_records(name)
        if r["record"] == "candidate"
    }
    *_, fused, summed, verdict = records
    assert fused == recorded["fused_ssl_types"] and summed == recorded["sum_ssl_types"]
    assert verdict["own_pathway"] == "images_new_mean" and verdict["replaces"] is None
    assert verdict["image_pathway"] == "images_ssl_types"
    assert verdict["adopted_as_recipe"] is None  # neither beats the recipe in both metrics
    assert not verdict["bars_sum_ssl_types"]["bar_fused_plus_0.05_ci_above_0"]


def test_logit_sum_adds_the_logits_and_thresholds_on_inner_validation(
    study_dlmi: ModuleType, tmp_path: Path
) -> None:
    import numpy as np
    import pandas as pd

    def write(folder: Path, oof: list[float], inner: list[float]) -> Path:
        folder.mkdir()
        keys = {"repeat": 0, "fold": 0}
        pd.DataFrame({**keys, "id": ["a", "b"], "label": [0, 1], "probability": oof}).to_csv(
            folder / "oof_predictions.csv", index=False
        )
        pd.DataFrame(
            {**keys, "id": ["c", "d", "e"], "label": [0, 1, 1], "probability": inner}
        ).to_csv(folder / "inner_val_predictions.csv", index=False)
        return folder

    first = write(tmp_path / "first", [0.5, 0.8], [0.3, 0.6, 0.9])
    second = write(tmp_path / "second", [0.2, 0.5], [0.5, 0.5, 0.5])
    oof = study_dlmi.logit_sum(first, second)
    np.testing.assert_allclose(oof["probability"], [0.2, 0.8])  # logits 0 + log(1/4), log 4 + 0
    assert list(oof["predicted"]) == [0, 1]  # the inner threshold lies in (0.3, 0.6]
    assert 0.3 < oof["threshold"].iloc[0] <= 0.6
    broken = write(tmp_path / "broken", [0.5, 0.5], [0.3, 0.6, 0.9])
    pd.read_csv(broken / "oof_predictions.csv").iloc[:1].to_csv(
        broken / "oof_predictions.csv", index=False
    )
    with pytest.raises(ValueError, match="same oof_predictions"):
        study_dlmi.logit_sum(first, broken)


def test_logit_sum_weighs_each_experts_logits(study_dlmi: ModuleType, tmp_path: Path) -> None:
    import numpy as np

    folders = []
    for name, oof in (("a", [0.5, 0.9]), ("b", [0.2, 0.5]), ("c", [0.8, 0.1])):
        folders.append(write_predictions(tmp_path / name, [0, 1], oof, [0.3, 0.6, 0.9]))
    oof = study_dlmi.logit_sum(*folders, weights=[1 / 3] * 3)
    logits = np.log([[1, 9], [1 / 4, 1], [4, 1 / 9]])  # the three experts' logits
    expected = 1 / (1 + np.exp(-logits.mean(axis=0)))
    np.testing.assert_allclose(oof["probability"], expected)
    with pytest.raises(ValueError, match="two or more"):
        study_dlmi.logit_sum(folders[0], weights=[1.0])
    with pytest.raises(ValueError, match="3 folders and 2 weights"):
        study_dlmi.logit_sum(*folders, weights=[0.5, 0.5])


def write_predictions(
    folder: Path, labels: list[int], oof: list[float], inner: list[float], folds: int = 1
) -> Path:
    """A cv output folder holding ``oof_predictions.csv`` (patients p0, p1, ... with
    ``labels``, predicted at 0.5) and ``inner_val_predictions.csv`` (labels 0, 1, 1, ...),
    ``folds`` times."""
    import pandas as pd

    folder.mkdir()
    oofs, inners = [], []
    for fold in range(folds):
        keys = {"repeat": 0, "fold": fold}
        ids = [f"p{i}" for i in range(fold, len(oof) * folds, folds)][: len(oof)]
        predicted = [int(q >= 0.5) for q in oof]
        columns = {"label": labels, "probability": oof, "predicted": predicted}
        oofs.append(pd.DataFrame({**keys, "id": ids, **columns}))
        inner_labels = [0] + [1] * (len(inner) - 1)
        ids = [f"q{fold}-{i}" for i in range(len(inner))]
        inners.append(
            pd.DataFrame({**keys, "id": ids, "label": inner_labels, "probability": inner})
        )
    pd.concat(oofs).to_csv(folder / "oof_predictions.csv", index=False)
    pd.concat(inners).to_csv(folder / "inner_val_predictions.csv", index=False)
    return folder


@pytest.mark.parametrize("control_auroc", [0.0, 1.01])
def test_the_seventeenth_round_judges_the_ensemble_against_the_same_encoders_cell_types(
    study_dlmi: ModuleType, monkeypatch: pytest.MonkeyPatch, tmp_path: Path, control_auroc: float
) -> None:
    """The ensemble stands only above the recorded cell types' AUROC; the contender judged
    against the recipe is the standing pathway's logit sum; nothing is cross-validated."""
    import argparse

    import numpy as np

    rng = np.random.default_rng(0)
    labels = [0, 1] * 10
    for name in ("tabular_mlp", "fused_morphology_mean", *study_dlmi.image_heads("ssl")):
        oof = np.clip(np.array(labels) * 0.4 + rng.uniform(0.05, 0.55, 20), 0.01, 0.99)
        write_predictions(tmp_path / name, labels, list(oof), [0.2, 0.7, 0.8], folds=2)
    recorded = [
        scored("tabular_mlp", 0.78, 0.90),
        scored("fused_morphology_mean", 0.806, 0.909),
        scored("images_ssl_types", 0.77, control_auroc),
    ]
    monkeypatch.setattr(study_dlmi, "read_records", lambda name: recorded)
    monkeypatch.setattr(study_dlmi, "_cv", pytest.fail)
    args = argparse.Namespace(out_sixteenth=tmp_path)
    records = {r.get("candidate", r["record"]): r for r in study_dlmi.round17(args)}
    assert list(records) == [
        "tabular_mlp",
        "fused_morphology_mean",
        "images_ssl_types",
        "images_ssl_ensemble",
        "sum_ssl_ensemble",
        "sum_ssl_types",
        "verdict",
    ]
    ensemble, verdict = records["images_ssl_ensemble"], records["verdict"]
    assert {"minus_tabular_mlp", "minus_images_ssl_types"} <= ensemble.keys()
    assert "minus_images_ssl_types" not in records["sum_ssl_ensemble"]
    stands = control_auroc == 0.0
    assert verdict["replaces"] == ("images_ssl_types" if stands else None)
    contender = "sum_ssl_ensemble" if stands else "sum_ssl_types"
    assert [k for k in verdict if k.startswith("bars_")] == [f"bars_{contender}"]


@pytest.mark.parametrize("recipe_auroc", [0.0, 1.01])
def test_the_eighteenth_round_judges_its_sum_against_the_seventeenth_rounds_recipe(
    study_dlmi: ModuleType, monkeypatch: pytest.MonkeyPatch, tmp_path: Path, recipe_auroc: float
) -> None:
    """The co-trained heads' ensemble against the co-trained cell types; its sum against the
    recipe the seventeenth round adopted (``sum_ssl_ensemble``, as recorded), with the paired
    differences to that recipe's out-of-fold predictions (remade from the controls)."""
    import argparse

    import numpy as np

    rng = np.random.default_rng(1)
    labels = [0, 1] * 10
    heads = [*study_dlmi.image_heads("ssl"), *study_dlmi.image_heads("ssl_pl")]
    for name in ("tabular_mlp", "fused_morphology_mean", *heads):
        oof = np.clip(np.array(labels) * 0.4 + rng.uniform(0.05, 0.55, 20), 0.01, 0.99)
        write_predictions(tmp_path / name, labels, list(oof), [0.2, 0.7, 0.8], folds=2)
    records = {
        "dlmi-round16": [
            scored("tabular_mlp", 0.78, 0.90),
            scored("fused_morphology_mean", 0.806, 0.909),
            scored("images_ssl_pl_types", 0.75, 0.0),  # the ensemble stands
        ],
        "dlmi-round17": [scored("sum_ssl_ensemble", 0.0, recipe_auroc), {"record": "verdict"}],
    }
    monkeypatch.setattr(study_dlmi, "read_records", records.__getitem__)
    monkeypatch.setattr(study_dlmi, "_cv", pytest.fail)
    args = argparse.Namespace(out_sixteenth=tmp_path)
    rows = {r.get("candidate", r["record"]): r for r in study_dlmi.round18(args)}
    assert list(rows)[:1] == ["sum_ssl_ensemble"] and "sum_ssl_pl_ensemble" in rows
    assert "minus_sum_ssl_ensemble" in rows["sum_ssl_pl_ensemble"]
    verdict = rows["verdict"]
    assert verdict["round"] == 18 and verdict["replaces"] == "images_ssl_pl_types"
    beaten = recipe_auroc == 0.0
    assert verdict["adopted_as_recipe"] == ("sum_ssl_pl_ensemble" if beaten else None)


def test_the_nineteenth_round_replicates_on_another_encoder_without_training_the_references(
    study_dlmi: ModuleType, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """The six heads on the new encoder (`_rows`), the references found in the sixteenth
    round's folder; co-training's effect per head; both ensembles and sums; the verdict on the
    co-trained ensemble's sum read from its own row."""
    import argparse

    import numpy as np
    import pandas as pd

    rng = np.random.default_rng(2)
    labels = [0, 1] * 10
    plain, cotrained = study_dlmi.image_heads("ssl"), study_dlmi.image_heads("ssl_pl")
    for name in ("tabular_mlp", "fused_morphology_mean", *plain, *cotrained):
        oof = np.clip(np.array(labels) * 0.4 + rng.uniform(0.05, 0.55, 20), 0.01, 0.99)
        write_predictions(tmp_path / name, labels, list(oof), [0.2, 0.7, 0.8], folds=2)
    weights = tmp_path / "encoder.pt"
    monkeypatch.setattr(study_dlmi, "ssl_weights", lambda *args, **kwargs: (weights, 1.0))
    monkeypatch.setattr(study_dlmi, "pretraining_record", lambda *a: {"record": "pretraining"})
    monkeypatch.setattr(study_dlmi, "challenge_layout", lambda *args: tmp_path / "data")
    wanted: list[list[str]] = []
    monkeypatch.setattr(study_dlmi, "_rows", lambda c, names, *a, **k: wanted.append(names) or [])

    def found(name: str, config: dict, args: argparse.Namespace, earlier: Path) -> tuple:
        assert earlier == tmp_path
        return pd.read_csv(tmp_path / name / "oof_predictions.csv", dtype={"id": str}), (
            tmp_path / name
        )

    monkeypatch.setattr(study_dlmi, "_cv", found)
    args = argparse.Namespace(
        data=tmp_path,
        unlabelled=tmp_path,
        cache_dir=None,
        out=tmp_path / "r19",
        out_sixteenth=tmp_path,
    )
    records = list(study_dlmi.round19(args))
    assert wanted == [[*plain, *cotrained]]
    effects = [r["candidate"] for r in records if r["record"] == "co_training_effect"]
    assert effects == cotrained
    rows = {r["candidate"]: r for r in records if r["record"] == "candidate"}
    assert list(rows) == [
        "images_ssl_ensemble",
        "sum_ssl_types",
        "sum_ssl_ensemble",
        "images_ssl_pl_ensemble",
        "sum_ssl_pl_types",
        "sum_ssl_pl_ensemble",
    ]
    assert "minus_images_ssl_pl_types" in rows["images_ssl_pl_ensemble"]
    verdict = records[-1]
    versus = rows["sum_ssl_pl_ensemble"]["minus_tabular_mlp"]
    expected = versus["balanced_accuracy"]["ci95_low"] > 0 and versus["auroc"]["mean"] > 0
    assert verdict["round"] == 19 and verdict["confirmed"] == expected
    assert verdict["candidate"] == "sum_ssl_pl_ensemble"


def qualified(name: str, balanced_accuracy: float, auroc: float, ci95_low: float) -> dict:
    """`scored`, with the interval's lower end of the gain over ``tabular_mlp``."""
    row = scored(name, balanced_accuracy, auroc)
    row["minus_tabular_mlp"]["balanced_accuracy"]["ci95_low"] = ci95_low
    return row


@pytest.mark.parametrize(
    ("plain", "cotrained", "shipped"),
    [
        ((0.83, 0.92, 0.01), (0.84, 0.93, 0.01), "logit_sum_ssl_pl"),  # beats it in both
        ((0.83, 0.92, 0.01), (0.84, 0.92, 0.01), "logit_sum_ssl"),  # a tie is no win
        ((0.83, 0.92, 0.0), (0.82, 0.91, 0.01), "logit_sum_ssl_pl"),  # the only one qualified
        ((0.83, 0.905, 0.01), (0.80, 0.95, 0.01), None),  # neither beats the recipe in both
    ],
)
def test_the_twentieth_round_ships_the_simpler_model_unless_the_other_beats_it(
    study_dlmi: ModuleType,
    plain: tuple[float, float, float],
    cotrained: tuple[float, float, float],
    shipped: str | None,
) -> None:
    rows = {
        "fused_morphology_mean": scored("fused_morphology_mean", 0.806, 0.909),
        "logit_sum_ssl": qualified("logit_sum_ssl", *plain),
        "logit_sum_ssl_pl": qualified("logit_sum_ssl_pl", *cotrained),
    }
    verdict = study_dlmi.logit_sum_verdict(20, rows)
    assert verdict["round"] == 20 and verdict["shipped"] == shipped
    assert set(verdict) >= {"bars_logit_sum_ssl", "bars_logit_sum_ssl_pl"}


@pytest.mark.parametrize("round_no", [20, 21, 22])
def test_the_logit_sum_rounds_run_the_one_model_beside_the_references_they_find(
    study_dlmi: ModuleType, monkeypatch: pytest.MonkeyPatch, tmp_path: Path, round_no: int
) -> None:
    """The references and both LogitSumMIL candidates (with expert selection from the
    twenty-first round on) go through `_cv` with the sixteenth round's folder to search; each row
    holds its paired differences to the separately trained sums remade from that folder's
    heads; the twenty-first round adds each candidate's difference to its twentieth-round
    twin; the twenty-second asks for the seed-1 encoder and compares with its heads' sums."""
    import argparse

    import numpy as np
    import pandas as pd

    rng = np.random.default_rng(3)
    labels = [0, 1] * 10
    heads = [*study_dlmi.image_heads("ssl"), *study_dlmi.image_heads("ssl_pl")]
    names = ["tabular_mlp", "fused_morphology_mean", "logit_sum_ssl", "logit_sum_ssl_pl"]
    for name in [*names, *heads]:
        oof = np.clip(np.array(labels) * 0.4 + rng.uniform(0.05, 0.55, 20), 0.01, 0.99)
        folder = write_predictions(tmp_path / name, labels, list(oof), [0.2, 0.7, 0.8], folds=2)
        (folder / "cv_report.json").write_text(
            json.dumps({"wall_time_s": 1.0, "folds": 2, "repeats": 1, "n_patients": 40})
        )
    weights = tmp_path / "encoder.pt"
    encoders: list[object] = []
    monkeypatch.setattr(
        study_dlmi, "ssl_weights", lambda *args: encoders.append(args[-1]) or (weights, 1.0)
    )
    monkeypatch.setattr(study_dlmi, "pretraining_record", lambda *a: {"record": "pretraining"})
    monkeypatch.setattr(study_dlmi, "challenge_layout", lambda *args: tmp_path / "data")
    configs: dict[str, dict] = {}

    def found(name: str, config: dict, args: argparse.Namespace, earlier: Path) -> tuple:
        assert earlier == tmp_path
        configs[name] = config
        oof = pd.read_csv(tmp_path / name / "oof_predictions.csv", dtype={"id": str})
        return oof, tmp_path / name

    monkeypatch.setattr(study_dlmi, "_cv", found)
    args = argparse.Namespace(
        data=tmp_path,
        unlabelled=tmp_path,
        cache_dir=None,
        out=None if round_no == 20 else tmp_path,
        out_sixteenth=tmp_path,
        out_twentieth=tmp_path,
        out_nineteenth=tmp_path,
    )
    records = list(getattr(study_dlmi, f"round{round_no}")(args))
    seed = study_dlmi.SEED1_SETTINGS if round_no == 22 else study_dlmi.SSL_SETTINGS
    assert encoders == [seed]
    assert list(configs) == names
    data = {n: configs[n]["data"]["init_args"] for n in names[2:]}
    assert data["logit_sum_ssl"]["features"]["weights"] == str(weights)
    assert "split" not in data["logit_sum_ssl"]
    assert data["logit_sum_ssl_pl"]["split"] == {"teacher_confidence": 0.9}
    for name in names[2:]:
        model, monitor = configs[name]["model"], configs[name]["checkpoint"]["monitor"]
        assert model["class_path"] == "LogitSumMIL"
        selecting = model["init_args"]["expert_selection"]
        assert (selecting, monitor) == (round_no != 20, "val_loss")
    rows = {r["candidate"]: r for r in records if r["record"] == "candidate"}
    assert list(rows) == names
    assert {"minus_sum_ssl_ensemble", "minus_sum_ssl_pl_ensemble"} <= rows["logit_sum_ssl"].keys()
    verdicts = [r for r in records if r["record"] == "verdict"]
    assert len(verdicts) == 1 and verdicts[0]["round"] == round_no
    if round_no == 22:  # a replication: nothing ships from it
        assert verdicts[0]["shipped"] is None and "would_ship" in verdicts[0]
    effects = [r["candidate"] for r in records if r["record"] == "selection_effect"]
    assert effects == (names[2:] if round_no == 21 else [])


def test_the_twenty_third_round_averages_two_encoders_heads_without_training(
    study_dlmi: ModuleType, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """Six heads (three per encoder folder) averaged, with and without co-training; their sums
    with the clinical model; the bars; nothing cross-validated, nothing shipped."""
    import argparse

    import numpy as np

    rng = np.random.default_rng(4)
    labels = [0, 1] * 10
    heads = [*study_dlmi.image_heads("ssl"), *study_dlmi.image_heads("ssl_pl")]
    for folder, names in (
        ("seed0", ["tabular_mlp", "fused_morphology_mean", *heads]),
        ("seed1", heads),
    ):
        (tmp_path / folder).mkdir()
        for name in names:
            oof = np.clip(np.array(labels) * 0.4 + rng.uniform(0.05, 0.55, 20), 0.01, 0.99)
            write_predictions(tmp_path / folder / name, labels, list(oof), [0.2, 0.7, 0.8], folds=2)
    monkeypatch.setattr(study_dlmi, "_cv", pytest.fail)
    args = argparse.Namespace(out_sixteenth=tmp_path / "seed0", out_nineteenth=tmp_path / "seed1")
    records = list(study_dlmi.round23(args))
    rows = {r["candidate"]: r for r in records if r["record"] == "candidate"}
    assert list(rows) == [
        "images_2enc_ensemble",
        "sum_2enc_ensemble",
        "images_2enc_pl_ensemble",
        "sum_2enc_pl_ensemble",
    ]
    assert "minus_images_ssl_pl_types" in rows["images_2enc_ensemble"]
    verdict = records[-1]
    assert verdict["shipped"] is None and set(verdict) >= {"bars_2enc", "bars_2enc_pl"}
    assert "bar_images_balanced_accuracy_0.80" in verdict["bars_2enc"]


def test_same_patient_neighbours_tells_a_smear_fingerprint_from_cell_features(
    study_dlmi: ModuleType,
) -> None:
    """A feature that carries each patient's own offset (a stain) finds the patient; one of
    the cells alone, drawn alike in every patient, finds it at chance."""
    rng = np.random.default_rng(0)
    patients = np.repeat(np.arange(20), 30)
    cells = rng.normal(size=(len(patients), 8))
    stain = rng.normal(size=(20, 8))[patients] * 3
    assert study_dlmi.same_patient_neighbours(cells + stain, patients) > 0.9
    assert study_dlmi.same_patient_neighbours(cells, patients) < 0.15  # chance: 29 / 599


def test_per_patient_standardised_gives_every_patient_the_same_colours(
    study_dlmi: ModuleType,
) -> None:
    rng = np.random.default_rng(0)
    patients = np.repeat(np.arange(3), 10)
    cast = np.array([[40, 0, 0], [0, 40, 0], [0, 0, 40]])[patients][:, None, None]
    pixels = (rng.integers(60, 160, size=(30, 8, 8, 3)) + cast).astype(np.uint8)
    out = study_dlmi.per_patient_standardised(pixels, patients)
    means = np.stack([out[patients == p].reshape(-1, 3).mean(0) for p in range(3)])
    assert np.ptp(means, axis=0).max() < 1  # the casts are gone
    before = np.stack([pixels[patients == p].reshape(-1, 3).mean(0) for p in range(3)])
    assert np.ptp(before, axis=0).min() > 30
    stats = study_dlmi.colour_statistics(out, np.ones((8, 8), dtype=bool))
    assert stats.shape == (30, 15)


@pytest.mark.parametrize(
    ("better_encoder", "model", "shipped"),
    [
        (True, (0.84, 0.93, 0.01), "logit_sum_ssl_centre160"),
        (False, (0.84, 0.93, 0.01), None),  # no better encoder: nothing ships
        (True, (0.84, 0.93, 0.0), None),  # its gain's interval reaches 0
        (True, (0.84, 0.915, 0.01), None),  # not above LogitSumMIL's AUROC at 112 px
    ],
)
def test_the_twenty_seventh_round_ships_only_a_model_of_a_better_encoder(
    study_dlmi: ModuleType,
    better_encoder: bool,
    model: tuple[float, float, float],
    shipped: str | None,
) -> None:
    rows = {
        "fused_morphology_mean": scored("fused_morphology_mean", 0.806, 0.909),
        "logit_sum_ssl": scored("logit_sum_ssl", 0.817, 0.916),
        "logit_sum_ssl_centre160": qualified("logit_sum_ssl_centre160", *model),
    }
    encoder = {"record": "verdict", "round": 27, "better_encoder": better_encoder}
    verdict = study_dlmi.round27_verdict(encoder, rows)
    assert verdict["round"] == 27 and verdict["shipped"] == shipped
    assert verdict["adopt_centre_160"] == better_encoder
    assert "bars_logit_sum_ssl_centre160" in verdict


@pytest.mark.parametrize("round_no", [24, 27])
def test_the_encoder_rounds_compare_each_head_with_its_seed0_twin(
    study_dlmi: ModuleType, monkeypatch: pytest.MonkeyPatch, tmp_path: Path, round_no: int
) -> None:
    """Each head and ensemble of the new encoder against its twin of the sixteenth round's
    folder, new minus old; the verdict needs the co-trained ensemble above both recorded
    SimCLR encoders and its AUROC gain's interval above 0; the twenty-fifth round refuses to
    run after a verdict that found no better encoder. The twenty-seventh round's encoder
    reads the 160 px centre, and its LogitSumMIL runs beside the 112 px one it finds."""
    import argparse

    import pandas as pd

    rng = np.random.default_rng(3)
    labels = [0, 1] * 10
    heads = [*study_dlmi.image_heads("ssl"), *study_dlmi.image_heads("ssl_pl")]
    seed0, new, twentysixth = tmp_path / "r16", tmp_path / "r24", tmp_path / "r26"
    seed0.mkdir(), new.mkdir(), twentysixth.mkdir()
    for name in ("tabular_mlp", "fused_morphology_mean", *heads):
        noisy = np.clip(np.array(labels) * 0.2 + rng.uniform(0.1, 0.7, 20), 0.01, 0.99)
        write_predictions(seed0 / name, labels, list(noisy), [0.2, 0.7, 0.8], folds=2)
    for name in heads:  # the new encoder's heads rank every patient right
        sharp = [0.1 + 0.8 * label for label in labels]
        write_predictions(new / name, labels, sharp, [0.2, 0.7, 0.8], folds=2)
    for folder, name in ((twentysixth, "logit_sum_ssl"), (new, "logit_sum_ssl_centre160")):
        noisy = np.clip(np.array(labels) * 0.3 + rng.uniform(0.1, 0.7, 20), 0.01, 0.99)
        write_predictions(folder / name, labels, list(noisy), [0.2, 0.7, 0.8], folds=2)
    for folder in (seed0 / "tabular_mlp", seed0 / "fused_morphology_mean", *new.iterdir()):
        (folder / "cv_report.json").write_text(
            json.dumps({"wall_time_s": 1.0, "folds": 2, "repeats": 1, "n_patients": 40})
        )
    (twentysixth / "logit_sum_ssl" / "cv_report.json").write_text(
        (new / "logit_sum_ssl_centre160" / "cv_report.json").read_text()
    )
    centres: list[int] = []

    def weights(*args: object, center_crop: int = 112) -> tuple[Path, float]:
        centres.append(center_crop)
        return tmp_path / f"e{center_crop}.pt", 1.0

    monkeypatch.setattr(study_dlmi, "ssl_weights", weights)
    monkeypatch.setattr(study_dlmi, "pretraining_record", lambda *a: {"record": "pretraining"})
    monkeypatch.setattr(study_dlmi, "challenge_layout", lambda *args: tmp_path / "data")
    monkeypatch.setattr(study_dlmi, "_rows", lambda *a, **k: [])
    configs: dict[str, dict] = {}

    def found(name: str, config: dict, args: argparse.Namespace, earlier: Path) -> tuple:
        folder = (earlier or new if name not in heads else new) / name
        if name in heads or name.startswith("logit_sum"):
            configs[name] = config
        return pd.read_csv(folder / "oof_predictions.csv", dtype={"id": str}), folder

    monkeypatch.setattr(study_dlmi, "_cv", found)
    args = argparse.Namespace(
        data=tmp_path,
        unlabelled=tmp_path,
        cache_dir=None,
        out=new,
        out_sixteenth=seed0,
        out_twentysixth=twentysixth,
    )
    records = list(getattr(study_dlmi, f"round{round_no}")(args))
    effects = {r["candidate"]: r for r in records if r["record"] == "encoder_effect"}
    assert list(effects) == [
        *study_dlmi.image_heads("ssl"),
        "images_ssl_ensemble",
        *study_dlmi.image_heads("ssl_pl"),
        "images_ssl_pl_ensemble",
    ]
    assert all(e["auroc"]["mean"] > 0 for e in effects.values())  # new minus old
    verdict = records[-1]
    assert verdict["round"] == round_no and verdict["candidate"] == "images_ssl_pl_ensemble"
    assert verdict["simclr_best_auroc"] > 0.85  # the nineteenth round's record
    low = effects["images_ssl_pl_ensemble"]["auroc"]["ci95_low"]
    assert verdict["better_encoder"] == (low > 0)
    centre = 160 if round_no == 27 else 112
    for name in heads:
        crops = configs[name]["data"]["init_args"]["crops"]
        assert crops["center_crop"] == centre
        assert configs[name]["data"]["init_args"]["features"]["weights"] == str(
            tmp_path / f"e{centre}.pt"
        )
    if round_no == 24:
        lost = [{"record": "verdict", "better_encoder": False}]
        monkeypatch.setattr(study_dlmi, "read_records", lambda name: lost)
        with pytest.raises(SystemExit, match="no better encoder"):
            list(study_dlmi.round25(args))
        return
    assert centres == [160, 112, 160]
    for name, centre in (("logit_sum_ssl", 112), ("logit_sum_ssl_centre160", 160)):
        data = configs[name]["data"]["init_args"]
        assert data["crops"]["center_crop"] == centre
        assert data["features"]["weights"] == str(tmp_path / f"e{centre}.pt")
    rows = {r["candidate"]: r for r in records if r["record"] == "candidate"}
    assert list(rows)[-2:] == ["logit_sum_ssl", "logit_sum_ssl_centre160"]
    assert "minus_logit_sum_ssl" in rows["logit_sum_ssl_centre160"]
    assert {"qualifies", "beats_logit_sum", "adopt_centre_160", "shipped"} <= verdict.keys()


@pytest.mark.parametrize(
    ("ensemble_auroc", "model", "shipped"),
    [
        (0.87, (0.84, 0.93, 0.01), "logit_sum_ssl_stain"),
        (0.855, (0.84, 0.93, 0.01), None),  # below the seed-1 encoder's 0.860: no better encoder
        (0.87, (0.84, 0.93, 0.0), None),  # its gain's interval reaches 0
        (0.87, (0.82, 0.93, 0.01), None),  # not above the seed-1 LogitSumMIL's 0.828
    ],
)
def test_the_twenty_eighth_round_judges_by_the_simclr_encoders_records(
    study_dlmi: ModuleType, ensemble_auroc: float, model: tuple[float, ...], shipped: str | None
) -> None:
    heads = {
        "images_ssl_pl_ensemble": scored("images_ssl_pl_ensemble", 0.78, ensemble_auroc),
        "sum_ssl_pl_ensemble": scored("sum_ssl_pl_ensemble", 0.83, 0.92),
    }
    rows = {
        "fused_morphology_mean": scored("fused_morphology_mean", 0.806, 0.909),
        "logit_sum_ssl_stain": qualified("logit_sum_ssl_stain", *model),
    }
    verdict = study_dlmi.round28_verdict(heads, rows)
    assert verdict["round"] == 28 and verdict["shipped"] == shipped
    assert verdict["simclr_best_auroc"] == pytest.approx(0.8603, abs=1e-4)  # seed 1's record
    assert verdict["adopt_stain_jitter"] == (ensemble_auroc > 0.8603)
    assert verdict["bar_images_auroc_0.85"] and "bars_logit_sum_ssl_stain" in verdict


def test_the_twenty_eighth_round_trains_on_the_stain_jittered_encoder(
    study_dlmi: ModuleType, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """Every head and LogitSumMIL read the encoder pretrained with stain jitter; the
    references run beside them; the verdict comes last."""
    import argparse

    import pandas as pd

    rng = np.random.default_rng(5)
    labels = [0, 1] * 10
    heads = [*study_dlmi.image_heads("ssl"), *study_dlmi.image_heads("ssl_pl")]
    out = tmp_path / "r28"
    out.mkdir()
    for name in ("tabular_mlp", "fused_morphology_mean", "logit_sum_ssl_stain", *heads):
        noisy = np.clip(np.array(labels) * 0.3 + rng.uniform(0.1, 0.7, 20), 0.01, 0.99)
        write_predictions(out / name, labels, list(noisy), [0.2, 0.7, 0.8], folds=2)
        (out / name / "cv_report.json").write_text(
            json.dumps({"wall_time_s": 1.0, "folds": 2, "repeats": 1, "n_patients": 40})
        )
    jitters: list[float] = []

    def weights(roots: object, cache: object, settings: Any, **kwargs: object) -> tuple:
        jitters.append(settings.stain_jitter)
        return tmp_path / f"stain{settings.stain_jitter}.pt", 1.0

    configs: dict[str, dict] = {}

    def run(name: str, config: dict, args: argparse.Namespace, earlier: Path | None) -> tuple:
        configs[name] = config
        return pd.read_csv(out / name / "oof_predictions.csv", dtype={"id": str}), out / name

    monkeypatch.setattr(study_dlmi, "ssl_weights", weights)
    monkeypatch.setattr(study_dlmi, "pretraining_record", lambda *a: {"record": "pretraining"})
    monkeypatch.setattr(study_dlmi, "challenge_layout", lambda *args: tmp_path / "data")
    monkeypatch.setattr(study_dlmi, "_rows", lambda *a, **k: [])
    monkeypatch.setattr(study_dlmi, "_cv", run)
    args = argparse.Namespace(
        data=tmp_path, unlabelled=tmp_path, cache_dir=None, out=out, out_sixteenth=tmp_path
    )
    records = list(study_dlmi.round28(args))
    assert jitters == [0.3, 0.3]  # the heads' encoder, then LogitSumMIL's
    for name in (*heads, "logit_sum_ssl_stain"):
        features = configs[name]["data"]["init_args"]["features"]
        assert features["weights"] == str(tmp_path / "stain0.3.pt")
    rows = {r["candidate"]: r for r in records if r["record"] == "candidate"}
    assert "images_ssl_pl_ensemble" in rows and "minus_tabular_mlp" in rows["logit_sum_ssl_stain"]
    assert records[-1]["record"] == "verdict" and records[-1]["round"] == 28
