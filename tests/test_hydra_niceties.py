"""Hydra niceties: Enum keys (logger.mode, precision) refuse typos at composition and are stored as plain strings,
tab completion offers `model@student=` options and Enum values, `--help` lists no internal group, `--cfg hydra
--resolve` resolves, and the SLURM preset requeues on timeout. All in-process (composition, Hydra's own functions)."""
import json
from pathlib import Path

import pytest
from hydra import compose, initialize
from hydra._internal.hydra import Hydra
from hydra.core.global_hydra import GlobalHydra
from hydra.errors import HydraException
from hydra.plugins.completion_plugin import DefaultCompletionPlugin
from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

import kd.config  # noqa: F401  (registers the schema)
from kd import completion, engine, records
from kd.config import LoggerMode, Precision
from support import tree_state

REPO = Path(__file__).resolve().parents[1]


def composed(*overrides: str, hydra_node: bool = False):
    with initialize(version_base="1.3", config_path="../conf"):
        return compose("config", overrides=list(overrides), return_hydra_config=hydra_node)


# ---------------------------------------------------------------------------------------------------------------
# Enum keys


@pytest.mark.parametrize("override, valid", [("precision=fp61", "[auto, fp32, bf16, fp16]"),
                                             ("logger.mode=onlne", "[online, offline, disabled]")])
def test_a_misspelt_enum_value_fails_at_composition_naming_the_valid_ones(override, valid):
    with pytest.raises((HydraException, OmegaConfBaseException)) as error:
        composed(override)
    message = f"{error.value}\n{error.value.__cause__}"
    assert f"Invalid value '{override.split('=')[1]}', expected one of {valid}" in message


def test_enum_keys_compose_to_members_and_are_recorded_as_plain_strings(monkeypatch):
    monkeypatch.delenv("WANDB_MODE", raising=False)
    cfg = composed("precision=bf16")
    assert cfg.precision is Precision.bf16 and cfg.logger.mode is LoggerMode.offline
    assert cfg.precision == "bf16" and f"{cfg.precision}" == "bf16"  # code that reads it as a string works on
    plain = records.plain_config(cfg)
    assert type(plain["precision"]) is str and type(plain["logger"]["mode"]) is str
    assert json.loads(json.dumps(plain))["precision"] == "bf16"
    # A record written when these keys were plain strings still matches the config: old runs resume.
    old = json.loads(json.dumps(plain))
    assert records.config_differences(old, records.plain_config(cfg), ()) == []


def test_wandb_mode_still_sets_the_logger_mode(monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "disabled")
    assert composed().logger.mode is LoggerMode.disabled
    assert composed("logger.mode=online").logger.mode is LoggerMode.online


def test_a_bad_wandb_mode_is_refused_naming_the_variable_and_the_fix(monkeypatch, tmp_path):
    monkeypatch.setenv("WANDB_MODE", "loud")
    cfg = composed("experiment=quickstart", f"teacher_store={tmp_path / 'teachers'}")
    (tmp_path / "run").mkdir()
    before = tree_state(tmp_path)
    with pytest.raises(ValueError) as error:
        engine.run(cfg, tmp_path / "run")
    assert str(error.value) == (
        "invalid config: logger.mode: While dereferencing interpolation '${oc.env:WANDB_MODE,offline}': Invalid value "
        "'loud', expected one of [online, offline, disabled]: set that variable to one of these values (or unset it), "
        "or give logger.mode=... on the command line")
    assert tree_state(tmp_path) == before


# ---------------------------------------------------------------------------------------------------------------
# tab completion: what Hydra's completion plugin answers for a command line (the shells ask it through -sc query=...)


@pytest.fixture
def complete():
    completion.install()
    with initialize(version_base="1.3", config_path="../conf"):
        plugin = DefaultCompletionPlugin(GlobalHydra.instance().config_loader())
        yield lambda line: plugin._query("config", line)


def test_completion_offers_the_options_of_a_group_mounted_at_a_package(complete):
    models = sorted(p.stem for p in (REPO / "conf" / "model").glob("*.yaml"))
    assert complete("model@student=") == [f"model@student={m}" for m in models]
    assert complete("phase=student model@teacher=wrn_40") == ["model@teacher=wrn_40_1", "model@teacher=wrn_40_2"]
    assert complete("+model@student=resnet8") == ["+model@student=resnet8", "+model@student=resnet8x4"]
    assert complete("mod") == ["model@student=", "model@teacher="]  # not model=, which Hydra would refuse
    assert complete("model@st") == ["model@student="]
    assert "optimizer@teacher_recipe.optimizer=" in complete("opt") and "optimizer=" in complete("opt")
    assert complete("dataset=ci") == ["dataset=cifar10", "dataset=cifar100"]  # plain groups as before


def test_completion_offers_every_value_of_an_enum_key(complete):
    assert complete("precision=") == ["precision=auto", "precision=bf16", "precision=fp16", "precision=fp32"]
    assert complete("precision=b") == ["precision=bf16"]
    assert complete("logger.mode=o") == ["logger.mode=offline", "logger.mode=online"]
    assert complete("loss.alpha=") == ["loss.alpha=0.9"]  # other keys: their current value, as before


# ---------------------------------------------------------------------------------------------------------------
# --help, --cfg hydra --resolve, the SLURM preset


def test_help_lists_the_config_groups_without_the_internal_schema():
    with initialize(version_base="1.3", config_path="../conf"):
        # what --help prints as its config groups ($APP_CONFIG_GROUPS of Hydra's help template)
        groups = GlobalHydra.instance().hydra.format_config_groups(lambda group: group.split("/")[0] != "hydra")
    names = [line.split(":")[0] for line in groups.splitlines()]
    assert names == ["dataset", "experiment", "loss", "model", "optimizer", "scheduler", "sweep", "teacher_recipe"]
    # the schema it held still types the library models' nodes
    with pytest.raises((HydraException, OmegaConfBaseException), match="nam"):
        composed("model@teacher=torchvision", "teacher.nam=resnet34")


@pytest.mark.parametrize("overrides", [[], ["phase=student", "sweep=optuna_kd", "hydra/launcher=slurm"]])
def test_cfg_hydra_resolve_resolves_the_hydra_node_alone(overrides):
    # `--cfg hydra --resolve` resolves what Hydra.get_sanitized_hydra_cfg keeps: the hydra node, without the job's keys
    hydra_node = Hydra.get_sanitized_hydra_cfg(composed(*overrides, hydra_node=True))
    OmegaConf.resolve(hydra_node)
    assert hydra_node.hydra.run.dir.startswith("outputs/<phase>/")


def test_run_folder_names_phase_and_dataset():
    run_dir = composed("phase=student", "dataset=digits", hydra_node=True).hydra.run.dir
    parts = Path(run_dir).parts
    assert parts[:2] == ("outputs", "student") and parts[3].endswith("_digits"), run_dir


def test_slurm_preset_requeues_a_job_that_times_out():
    launcher = composed("hydra/launcher=slurm", hydra_node=True).hydra.launcher
    assert launcher.max_num_timeout == 3 and launcher.timeout_min == 720
