"""Published results (kd/published/cifar100.yaml through kd.published): the file ships inside the package, every
figure names its source and convention, keys are this repository's pair and method names, and a handful of values
match their sources (the literals below, each with the source line it was read from)."""
import re
from pathlib import Path

import hydra
import pytest
from omegaconf import OmegaConf

import kd
import kd.config  # noqa: F401  (registers the typed root schema)
from kd import published, report

CONF = Path(__file__).resolve().parents[1] / "conf"
# The ImageNet pairs name torchvision's models (model@teacher=torchvision teacher.name=...), which kd.report labels
# by their torchvision names.
LIBRARY_MODELS = {"resnet18", "resnet34", "resnet50"}


def all_figures() -> list[published.Figure]:
    return [fig for name in published.names() for cell in published.load(name).figures.values() for fig in cell]


def test_the_data_file_ships_inside_the_package_and_loads():
    path = Path(kd.__file__).parent / "published" / published.DATA_FILE
    assert path.is_file()
    assert published.names() == ["crd", "dkd"]
    crd, dkd = published.load("crd"), published.load("dkd")
    # CRD: 7 pairs x 16 rows (FSP's N/A left out) + 6 pairs x 15 rows, + ImageNet's 3; DKD: KD and DKD over 11 pairs,
    # one cell twice, + ImageNet's 2 pairs x (student, KD twice, DKD, teacher).
    assert sum(len(cell) for cell in crd.figures.values()) == 7 * 16 - 1 + 6 * 15 + 3
    assert sum(len(cell) for cell in dkd.figures.values()) == 2 * 11 + 1 + 2 * 5
    assert "Tian" in crd.citation and "ICLR 2020" in crd.citation
    assert "Zhao" in dkd.citation and "CVPR 2022" in dkd.citation


def test_every_figure_names_its_source_and_convention():
    for fig in all_figures():
        # repository@commit path line N; or a paper's own table (no stored copy), which its note says
        stored = re.fullmatch(r"[\w.-]+/[\w.-]+@[0-9a-f]{7,40} \S+ line \d+", fig.source)
        paper = re.fullmatch(r"arXiv:\d{4}\.\d{4,5} .+", fig.source) and "not checked" in fig.note
        assert stored or paper, fig
        assert fig.convention in published.CONVENTIONS, fig
        assert fig.table and 0 < fig.top1 < 100, fig
    for name in published.names():
        paper = published.load(name)
        assert paper.convention in published.CONVENTIONS and paper.convention_evidence and paper.statistic


def test_imagenet_rows_keep_both_figures_where_sources_disagree():
    dkd = published.load("dkd")
    kd_figures = published.figures(dkd, "KD", "resnet34 -> resnet18")
    # mdistiller's README re-run (the recipe the ImageNet presets train, compared first), then the papers' figure
    assert [f.top1 for f in kd_figures] == [71.03, 70.66]
    assert kd_figures[0].source == "megvii-research/mdistiller@a08d46f README.md line 68"
    assert published.figure(dkd, "DKD", "resnet50 -> mobilenetv1").top1 == 72.05  # README line 69
    assert published.figure(dkd, "teacher", "resnet50 -> mobilenetv1").top1 == 76.16  # DIST_KD README line 47
    assert published.figure(published.load("crd"), "KD", "resnet34 -> resnet18").top1 == 70.66


def test_the_papers_conventions():
    # RepDistiller train_student.py lines 333-334: the paper/README report the last epoch.
    assert published.load("crd").convention == "last"
    # mdistiller issue #30: the DKD paper reports the best epoch.
    assert published.load("dkd").convention == "best"


def factory_names() -> set[str]:
    return {OmegaConf.load(path)._target_.rsplit(".", 1)[-1] for path in (CONF / "model").glob("*.yaml")}


def test_pairs_use_this_repositorys_model_names():
    known = factory_names() | LIBRARY_MODELS
    for fig in all_figures():
        teacher, student = fig.pair.split(" -> ")
        assert {teacher, student} <= known, fig.pair


@pytest.mark.parametrize("loss", ["kd", "fitnet", "at", "sp", "pkt", "rkd", "ab", "ft", "fsp", "crd", "crd_kd", "ce"])
def test_crd_methods_are_named_as_the_report_names_the_loss_options(loss):
    with hydra.initialize(version_base="1.3", config_path="../conf"):
        cfg = hydra.compose("config", overrides=[f"loss={loss}", "phase=student"])
    method = report.method_name(OmegaConf.to_container(cfg, resolve=True))
    assert published.figure(published.load("crd"), method, "resnet56 -> resnet20") is not None, method


def test_dkd_method_is_named_as_the_report_names_it():
    with hydra.initialize(version_base="1.3", config_path="../conf"):
        cfg = hydra.compose("config", overrides=["loss=dkd", "phase=student"])
    method = report.method_name(OmegaConf.to_container(cfg, resolve=True))
    assert published.figure(published.load("dkd"), method, "vgg13 -> vgg8").top1 == 74.68


def top1(name: str, method: str, pair: str) -> float:
    return published.figure(published.load(name), method, pair).top1


def test_spot_checks_against_the_sources():
    # HobbitLong/RepDistiller@b84f547c README.md
    assert top1("crd", "teacher", "resnet32x4 -> resnet8x4") == 79.42  # line 79
    assert top1("crd", "student", "resnet32x4 -> resnet8x4") == 72.50  # line 79
    assert top1("crd", "KD", "resnet56 -> resnet20") == 70.66  # line 80
    assert top1("crd", "AT", "vgg13 -> vgg8") == 71.43  # line 82
    assert top1("crd", "CRD", "resnet110 -> resnet32") == 73.48  # line 92
    assert top1("crd", "student", "vgg13 -> mobilenetv2") == 64.60  # line 98
    assert top1("crd", "teacher", "ResNet50 -> vgg8") == 79.34  # line 98
    assert top1("crd", "PKT", "resnet32x4 -> shufflenetv2") == 74.69  # line 106
    assert top1("crd", "CRD", "wrn_40_2 -> shufflenetv1") == 76.05  # line 110
    # giakoumoglou/distillers@3d7d68fb README.md (the paper's CRD+KD rows)
    assert top1("crd", "KD+CRD", "resnet32x4 -> resnet8x4") == 75.46  # line 155
    assert top1("crd", "KD+CRD", "ResNet50 -> mobilenetv2") == 69.54  # line 179
    # megvii-research/mdistiller@a08d46f README.md
    assert top1("dkd", "DKD", "resnet32x4 -> resnet8x4") == 76.32  # line 55
    assert top1("dkd", "DKD", "ResNet50 -> mobilenetv2") == 70.35  # line 61
    assert top1("dkd", "DKD", "resnet32x4 -> shufflenetv2") == 77.07  # line 61 (labelled ResNet32x4 -> MobileNet-V2)


def test_empty_cells_and_disagreements():
    crd, dkd = published.load("crd"), published.load("dkd")
    assert published.figure(crd, "FSP", "wrn_40_2 -> wrn_40_1") is None  # N/A in the README, line 90
    assert published.not_applicable(crd, "FSP", "wrn_40_2 -> wrn_40_1") == "N/A for wrn_40_2 -> wrn_40_1 in the README"
    assert published.figure(crd, "FSP", "vgg13 -> mobilenetv2") is None  # not in Table 2
    assert published.not_applicable(crd, "FSP", "vgg13 -> mobilenetv2") is None  # absent, not empty
    assert published.not_applicable(crd, "KD", "resnet56 -> resnet20") is None
    assert published.figure(dkd, "DKD", "ResNet50 -> vgg8") is None  # not a DKD pair
    # wrn_40_2 -> wrn_16_2: mdistiller README line 55 gives 76.23, logit-standardization README line 93 gives 76.24.
    first, second = published.figures(dkd, "DKD", "wrn_40_2 -> wrn_16_2")
    assert (first.top1, first.secondary, second.top1, second.secondary) == (76.23, False, 76.24, True)
    # The CRD+KD row is read from a copy of the paper's table, and marked so.
    assert published.figure(crd, "KD+CRD", "vgg13 -> vgg8").secondary
    assert not published.figure(crd, "CRD", "vgg13 -> vgg8").secondary


def test_the_cifar_figures_carry_the_setting_they_were_trained_in():
    # CIFAR-100 for 240 epochs (RepDistiller train_student.py lines 46, 57; mdistiller cfg.py lines 27, 42): kd.report
    # labels runs of another setting a short run. The ImageNet tables state none.
    cifar = [f for paper in ("crd", "dkd") for figs in published.load(paper).figures.values() for f in figs
             if "ImageNet" not in f.table]
    assert cifar and {(f.dataset, f.epochs) for f in cifar} == {("cifar100", 240)}
    imagenet = published.figure(published.load("dkd"), "DKD", "resnet34 -> resnet18")
    assert (imagenet.dataset, imagenet.epochs) == (None, None)


def test_row_conventions_override_the_papers():
    dkd = published.load("dkd")
    # DKD's KD row equals the CRD paper's KD row (last epoch); DKD's own runs are best-epoch figures.
    assert published.figure(dkd, "KD", "vgg13 -> vgg8").convention == "last"
    assert published.figure(dkd, "DKD", "vgg13 -> vgg8").convention == "best"
    assert published.figure(dkd, "KD", "vgg13 -> vgg8").top1 == top1("crd", "KD", "vgg13 -> vgg8")


def test_report_names_of_teacher_and_baseline_find_their_rows():
    crd = published.load("crd")
    pair = "resnet56 -> resnet20"
    assert published.figure(crd, "CE (no teacher)", pair) == published.figure(crd, "student", pair)
    assert published.figure(crd, "teacher (CE)", "resnet56 -> resnet20").top1 == 72.34  # README line 79
    assert published.figure(crd, "KD", "resnet56 -> resnet20 x0.5") is None  # no published figure at another width


def test_methods_pairs_and_citation_string():
    crd = published.load("crd")
    assert published.methods(crd)[:3] == ["teacher", "student", "KD"] and "KD+CRD" in published.methods(crd)
    assert len(published.pairs(crd)) == 13 + 1  # CIFAR-100 Tables 1 and 2, and ImageNet
    fig = published.figure(crd, "KD", "resnet56 -> resnet20")
    assert published.cite(fig) == "70.66 (Tian et al., ICLR 2020 (CRD), Table 1 (same architecture), last epoch)"


def test_unknown_name_lists_the_known_ones():
    with pytest.raises(ValueError, match=r"no published results named 'imagenet': known are crd, dkd"):
        published.load("imagenet")
