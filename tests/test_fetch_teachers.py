"""`python -m kd.teachers fetch crd`: the published teachers downloaded into a teachers_dir, each file's sha256
recorded in its manifest at the first fetch and verified at every later fetch and read. Tested against an HTTP
server on the loopback address (a thread of the test) serving files the test writes in the publishers' layouts."""
import functools
import hashlib
import io
import json
import os
import socket
import stat
import subprocess
import sys
import tarfile
import threading
from dataclasses import dataclass
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import torch
from hydra.utils import instantiate

from kd import engine, published_teachers, teachers
from kd.published_teachers import FetchFailed, fetch
from support import tree_state
from support.runs import compose_cfg as tiny_cfg

REPO = Path(__file__).resolve().parents[1]
LAYOUT = "{model}_vanilla/ckpt_epoch_240.pth"

pytestmark = pytest.mark.usefixtures("one_thread")


@dataclass
class Server:
    root: Path  # what it serves
    url: str
    requests: list  # (path, status) of every request, in order

    def template(self, folder: str = "repo") -> str:
        """A one-file-per-teacher source, as RepDistiller's host lays them out."""
        return f"{self.url}/{folder}/{{model}}_vanilla/ckpt_epoch_240.pth"


@pytest.fixture
def server(tmp_path, monkeypatch):
    monkeypatch.setenv("no_proxy", "127.0.0.1,localhost")  # a proxy from the environment never sees loopback URLs
    root = tmp_path / "served"
    root.mkdir()
    requests = []

    class Handler(SimpleHTTPRequestHandler):
        def log_request(self, code="-", size="-"):
            requests.append((self.path, int(code)))

        def log_message(self, *args):  # quiet
            pass

    httpd = ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(Handler, directory=str(root)))
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield Server(root, f"http://127.0.0.1:{httpd.server_port}", requests)
    httpd.shutdown()
    httpd.server_close()


def published_bytes(model: str, seed: int = 0, num_classes: int = 100) -> bytes:
    """A teacher file as RepDistiller's train_teacher.py writes ckpt_epoch_240.pth: its epoch, state_dict, accuracy
    (a tensor) and optimizer state, in the pre-1.6 serialisation of the PyTorch it was tested on."""
    torch.manual_seed(seed)
    node = published_teachers.model_node(model, num_classes)
    network = instantiate(node)
    optimizer = torch.optim.SGD(network.parameters(), lr=0.05, momentum=0.9)
    buffer = io.BytesIO()
    torch.save({"epoch": 240, "model": network.state_dict(), "accuracy": torch.tensor([70.1]),
                "optimizer": optimizer.state_dict()}, buffer, _use_new_zipfile_serialization=False)
    return buffer.getvalue()


def serve(server: Server, relative: str, data: bytes) -> None:
    path = server.root / relative
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)


def manifest(folder: Path) -> dict:
    return json.loads((folder / "manifest.json").read_text())


def without_lock(state: dict) -> dict:
    """A folder's state without the fetch's lock file (empty; it stays, as the teacher store's locks do)."""
    return {k: v for k, v in state.items() if k != ".fetch.lock"}


def closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_the_fetch_command_stores_the_files_with_their_manifest_and_a_later_fetch_only_verifies(tmp_path, server,
                                                                                                capsys):
    data = published_bytes("resnet56")
    serve(server, "repo/" + LAYOUT.format(model="resnet56"), data)
    folder = tmp_path / "cifar_teachers"
    command = ["fetch", "crd", "--dir", str(folder), "--from", server.template(), "--only", "resnet56"]
    assert published_teachers.main(command) == 0
    path = folder / "resnet56_vanilla" / "ckpt_epoch_240.pth"
    assert path.read_bytes() == data and not path.stat().st_mode & stat.S_IWUSR  # the served bytes, read-only
    entry = manifest(folder)["files"]["resnet56_vanilla/ckpt_epoch_240.pth"]
    assert entry["sha256"] == hashlib.sha256(data).hexdigest() and entry["size"] == len(data)
    assert entry["source"] == server.template().replace("{model}", "resnet56") and entry["model"] == "resnet56"
    assert entry["fetched_at"].endswith("+00:00")
    assert f"teachers_dir={folder}" in capsys.readouterr().out
    teacher = teachers.read(teachers.published_teacher(folder, "resnet56"), published_teachers.model_node("resnet56",
                                                                                                          100))
    assert teacher.format == "repdistiller"
    before, requests = tree_state(folder), len(server.requests)
    assert published_teachers.main(command) == 0  # present and recorded: verified, not downloaded again
    assert len(server.requests) == requests and tree_state(folder) == before


def test_a_killed_fetchs_scratch_is_removed_and_a_folder_it_did_not_make_is_left(tmp_path, server):
    """A later fetch deletes the scratch folder a killed fetch left (it holds the marker fetch writes), never a
    folder of the same name pattern that holds no marker."""
    serve(server, "repo/" + LAYOUT.format(model="resnet56"), published_bytes("resnet56"))
    folder = tmp_path / "cifar_teachers"
    killed, mine = folder / ".fetch-killed1", folder / ".fetch-notes"
    killed.mkdir(parents=True)
    (killed / published_teachers.SCRATCH_MARKER).touch()
    (killed / "resnet56.download").write_bytes(b"half a download")
    mine.mkdir()
    (mine / "todo.txt").write_text("the user's own")
    before = tree_state(mine)
    command = ["fetch", "crd", "--dir", str(folder), "--from", server.template(), "--only", "resnet56"]
    assert published_teachers.main(command) == 0
    assert not killed.exists() and tree_state(mine) == before
    assert sorted(p.name for p in folder.glob(".fetch-*")) == [".fetch-notes"]  # this fetch's scratch is gone too


def test_teachers_come_from_a_release_archive_under_its_top_folder_when_the_host_has_none(tmp_path, server):
    files = {model: published_bytes(model, num_classes=100) for model in ("resnet8", "wrn_16_1")}
    with tarfile.open(server.root / "cifar_teachers.tar", "w") as tar:  # mdistiller's: cifar_teachers/<layout>
        for model, data in files.items():
            info = tarfile.TarInfo(f"cifar_teachers/{LAYOUT.format(model=model)}")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    archive = f"{server.url}/cifar_teachers.tar"
    done = fetch(tmp_path / "teachers", ["resnet8", "wrn_16_1"], [server.template(), archive])
    assert sorted(done) == ["resnet8", "wrn_16_1"]
    for model, data in files.items():
        assert (tmp_path / "teachers" / LAYOUT.format(model=model)).read_bytes() == data
        entry = manifest(tmp_path / "teachers")["files"][LAYOUT.format(model=model)]
        assert (entry["source"], entry["archive_member"]) == (archive, f"cifar_teachers/{LAYOUT.format(model=model)}")
    assert [status for _, status in server.requests] == [404, 404, 200]  # each file from the host, then one archive
    assert not list((tmp_path / "teachers").glob(".fetch-*"))  # no scratch left


def test_a_later_download_whose_sha256_differs_from_the_manifest_is_refused_and_nothing_is_written(tmp_path, server,
                                                                                                  capsys):
    first, changed = published_bytes("resnet56", seed=0), published_bytes("resnet56", seed=1)
    serve(server, "repo/" + LAYOUT.format(model="resnet56"), first)
    folder = tmp_path / "cifar_teachers"
    command = ["fetch", "crd", "--dir", str(folder), "--from", server.template(), "--only", "resnet56"]
    assert published_teachers.main(command) == 0
    (folder / LAYOUT.format(model="resnet56")).unlink()  # lost (or this is another machine with the same manifest)
    serve(server, "repo/" + LAYOUT.format(model="resnet56"), changed)  # the host now serves other bytes
    before = tree_state(folder)
    assert published_teachers.main(command) == 1
    message = capsys.readouterr().err
    assert hashlib.sha256(changed).hexdigest() in message and hashlib.sha256(first).hexdigest() in message
    assert "refused" in message and server.template().replace("{model}", "resnet56") in message
    assert f"it belongs at {folder / LAYOUT.format(model='resnet56')}" in message
    assert tree_state(folder) == before  # the manifest keeps the first fetch's hash; no file, no scratch


def test_an_unreachable_source_names_each_url_the_file_and_where_to_put_a_copy(tmp_path, server):
    """Through `python -m kd.teachers` in a real process: what a user runs, exit status and stderr included."""
    folder = tmp_path / "cifar_teachers"
    folder.mkdir()
    archive = f"http://127.0.0.1:{closed_port()}/cifar_teachers.tar"
    command = [sys.executable, "-m", "kd.teachers", "fetch", "crd", "--dir", str(folder),
               "--from", archive, server.template(), "--only", "resnet56", "vgg13"]
    done = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=120,
                          env={**os.environ, "no_proxy": "127.0.0.1,localhost"})
    assert done.returncode == 1, done.stderr
    assert f"{archive}: unreachable (" in done.stderr and "Connection refused" in done.stderr
    for model in ("resnet56", "vgg13"):
        assert f"{server.template().replace('{model}', model)}: HTTP 404" in done.stderr
        assert f"{model}: no source served it; it belongs at {folder / LAYOUT.format(model=model)}" in done.stderr
    assert "shape2prog.csail.mit.edu, a university server) may be gone" in done.stderr
    assert f"put each file at {folder}/{LAYOUT}" in done.stderr and "--from file:///" in done.stderr
    assert without_lock(tree_state(folder)) == {}  # nothing written, nothing half-written


def test_a_download_that_is_not_the_models_checkpoint_is_refused(tmp_path, server):
    serve(server, "repo/" + LAYOUT.format(model="resnet8"), b"<html>moved</html>")  # a host's error page, as 200
    serve(server, "other/" + LAYOUT.format(model="resnet8"), published_bytes("resnet14"))  # another model's file
    folder = tmp_path / "teachers"
    with pytest.raises(FetchFailed) as failed:
        fetch(folder, ["resnet8"], [server.template("repo"), server.template("other")])
    assert str(failed.value).count("is not a readable resnet8 checkpoint") == 2
    assert "does not fit model@teacher=resnet8" in str(failed.value)
    assert without_lock(tree_state(folder)) == {}


def test_a_fetched_file_that_changed_is_refused_when_read_and_when_fetched_again(tmp_path, server):
    serve(server, "repo/" + LAYOUT.format(model="resnet8"), published_bytes("resnet8"))
    folder = tmp_path / "teachers"
    fetch(folder, ["resnet8"], [server.template()])
    path = folder / LAYOUT.format(model="resnet8")
    path.chmod(0o644)
    path.write_bytes(published_bytes("resnet8", seed=3))  # still a valid checkpoint: only the hash tells
    before = tree_state(folder)
    with pytest.raises(ValueError, match=r"ckpt_epoch_240\.pth has sha256 [0-9a-f]{64}, but .*manifest\.json recorded "
                                         r"[0-9a-f]{64} when it was fetched .*python -m kd\.teachers fetch crd --dir"):
        teachers.read(path, published_teachers.model_node("resnet8", 100))
    with pytest.raises(FetchFailed, match=r"the file changed since\. Delete it to fetch it again"):
        fetch(folder, ["resnet8"], [server.template()])
    assert tree_state(folder) == before


def test_a_file_copied_in_by_hand_is_recorded_at_the_next_fetch_without_a_download(tmp_path, server):
    folder = tmp_path / "teachers"
    data = published_bytes("resnet8")
    (folder / "resnet8_vanilla").mkdir(parents=True)
    (folder / LAYOUT.format(model="resnet8")).write_bytes(data)
    done = fetch(folder, ["resnet8"], [server.template()])
    assert "already there (not downloaded): recorded its sha256" in done["resnet8"] and not server.requests
    entry = manifest(folder)["files"][LAYOUT.format(model="resnet8")]
    assert (entry["sha256"], entry["source"]) == (hashlib.sha256(data).hexdigest(), "in place")


def test_a_student_run_records_the_sha256_the_manifest_holds(tmp_path, server):
    serve(server, "repo/" + LAYOUT.format(model="simple_cnn"), published_bytes("simple_cnn", num_classes=10))
    folder = tmp_path / "teachers_dir"
    fetch(folder, ["simple_cnn"], [server.template()], num_classes=10)  # the digits data's classes
    cfg = tiny_cfg(tmp_path, "phase=student", "epochs=1", "teacher.width=1", f"teachers_dir={folder}")
    result = engine.run(cfg, tmp_path / "run")
    assert result["teacher/sha256"] == manifest(folder)["files"][LAYOUT.format(model="simple_cnn")]["sha256"]
    assert (result["teacher/source"], result["teacher/format"]) == ("teachers_dir", "repdistiller")
