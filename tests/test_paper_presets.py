"""The paper presets as the papers ran them: fp32 unless told otherwise (RepDistiller and mdistiller train without
autocast), and `kd.report --paper dkd` setting the ImageNet presets beside the figures of the recipe they train."""
from pathlib import Path

import pytest
from hydra import compose, initialize
from omegaconf import OmegaConf

import kd.config  # noqa: F401  (registers the typed root schema)
from kd import published
from kd.report import keys as report

CONF = Path(__file__).resolve().parents[1] / "conf"
PAPER_PRESETS = sorted(p.stem for p in (CONF / "experiment").glob("*.yaml") if p.stem.startswith(("crd_", "imagenet_")))
PAPER_SWEEPS = ("crd_table1", "crd_table2", "methods_table", "imagenet_table")


def composed(*overrides: str):
    with initialize(version_base="1.3", config_path="../conf"):
        return compose("config", overrides=list(overrides))


def test_every_paper_preset_trains_in_fp32_and_a_command_line_precision_wins():
    assert len(PAPER_PRESETS) == 13 + 2
    for preset in PAPER_PRESETS:
        assert composed(f"experiment={preset}").precision == "fp32", preset
        assert composed(f"experiment={preset}", "precision=bf16").precision == "bf16", preset
        assert composed(f"experiment={preset}", "precision=auto").precision == "auto", preset


def test_other_presets_keep_precision_auto():
    assert composed().precision == "auto"
    for preset in ("quickstart", "seed_cifar10"):
        assert composed(f"experiment={preset}").precision == "auto", preset


@pytest.mark.parametrize("sweep", PAPER_SWEEPS)
def test_every_job_of_the_paper_sweeps_trains_in_fp32(sweep):
    params = OmegaConf.load(CONF / "sweep" / f"{sweep}.yaml").hydra.sweeper.params
    for preset in str(params.experiment).split(","):
        assert composed(f"sweep={sweep}", f"experiment={preset}").precision == "fp32", (sweep, preset)


@pytest.mark.parametrize("preset, figure", [("imagenet_resnet34_resnet18", 71.03),
                                            ("imagenet_resnet50_mobilenetv1", 70.50)])
def test_paper_dkd_compares_the_imagenet_presets_kd_with_the_recipe_they_train(preset, figure):
    config = OmegaConf.to_container(composed(f"experiment={preset}", "loss=kd"), resolve=True)
    assert (config["loss"]["alpha"], config["loss"]["temperature"]) == (0.5, 1.0)  # mdistiller's kd.yaml
    pair = f"{report.model_label(config['teacher'])} -> {report.model_label(config['student'])}"
    found = published.figure(published.load("dkd"), report.method_name(config), pair)
    assert found.top1 == figure and found.source == "megvii-research/mdistiller@a08d46f README.md line 68"


@pytest.mark.parametrize("loss, method", [("cc", "CC"), ("vid", "VID"), ("nst", "NST")])
def test_cc_vid_and_nst_runs_find_their_published_rows(loss, method):
    config = OmegaConf.to_container(composed(f"loss={loss}", "phase=student"), resolve=True)
    assert report.method_name(config) == method
    assert published.figure(published.load("crd"), method, "resnet56 -> resnet20") is not None
