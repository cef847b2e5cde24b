"""Job folders as train.py leaves them, written by hand, for kd.report's tests."""
import json
from pathlib import Path


def fake_job(folder: Path, overrides: list[str], config: dict, info: dict = None, **result) -> None:
    """A job folder as train.py leaves it: run.json with the overrides, result.json with the config, run_info.json,
    a two-epoch metrics.jsonl."""
    folder.mkdir(parents=True)
    (folder / "run.json").write_text(json.dumps({"overrides": overrides, "config": config, "seed_linked": []}))
    record = {"phase": "student", "best_selected_by": "val/acc1", "config": config, **result}
    (folder / "result.json").write_text(json.dumps(record))
    (folder / "run_info.json").write_text(json.dumps(info or {}))
    epochs = [{"epoch": 1, "test/acc1": result["test/acc1"] / 2}, {"epoch": 2, "test/acc1": result["test/acc1"]}]
    (folder / "metrics.jsonl").write_text("".join(json.dumps(e) + "\n" for e in epochs))


def fake_config(loss: dict, width: float, seed: int, **top) -> dict:
    """The config of a student run on simple_cnn, as result.json records it."""
    return {"phase": "student", "seed": seed, "epochs": 2, "device": "cpu", "logger": {"mode": "disabled"},
            "student": {"_target_": "kd.models.simple_cnn.simple_cnn", "width": width}, "loss": loss, **top}


def section(markdown: str, heading: str) -> str:
    """The text of one `## heading` section of a Markdown report."""
    return markdown.split(f"## {heading}", 1)[1].split("\n## ", 1)[0]
