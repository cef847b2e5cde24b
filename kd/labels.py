"""What a run is called: the loss as the papers' tables name the method, and the teacher -> student pair. One home for
both readers, kd.report (its method and pair keys) and kd.tracking (W&B tags and run names), so a W&B run and a
report row of the same job carry the same names; a leaf module, so training never imports the report's plotting."""
from typing import Any

# Short names of criteria whose class name is not "<name>Loss".
CRITERION_NAMES = {"SoftTargets": "KD", "Combined": ""}


BASELINE = "CE (no teacher)"  # the papers' "Student" row: the student trained on the labels alone


def model_label(node: dict[str, Any]) -> str:
    """A model as a pair names it: its factory (resnet20), or for a library option the model's name (resnet34);
    with its width when not 1."""
    name = node.get("name") or str(node.get("_target_", "?")).rsplit(".", 1)[-1]
    return name if node.get("width", 1.0) == 1.0 else f"{name} x{node['width']:g}"


def pair_label(config: dict[str, Any]) -> str:
    """A student run's pair as the tables name it: `resnet56 -> resnet20`."""
    return f"{model_label(config['teacher'])} -> {model_label(config['student'])}"


def method_name(config: dict[str, Any]) -> str:
    """The loss as the papers' tables name it: the criterion class without "Loss" (KD, DKD), "-LS" with logit
    standardisation, and for a combination its terms but CE joined by "+" (FitNet, KD+CRD); the baseline (CE alone,
    or KD with alpha 0, which is the same training) is BASELINE; the teacher phase always trains with cross-entropy."""
    if config.get("phase") == "teacher":
        return "teacher (CE)"
    loss = config.get("loss", {})
    if str(loss.get("_target_", "")).endswith(".Combined"):
        terms = [criterion_name(term) for term in loss.values() if isinstance(term, dict)]
        name = "+".join(name for name in terms if name != "CE") or "CE"
    else:
        name = criterion_name(loss)
    return BASELINE if name == "CE" or (name == "KD" and loss.get("alpha") == 0) else name


def criterion_name(node: dict[str, Any]) -> str:
    name = str(node.get("_target_", "?")).rsplit(".", 1)[-1]
    name = CRITERION_NAMES.get(name, name[: -len("Loss")] if name.endswith("Loss") and name != "Loss" else name)
    return name + ("-LS" if node.get("standardize") else "")
