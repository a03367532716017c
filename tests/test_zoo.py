"""The weight-file rule (ahiq.nn.zoo) against a real HTTP server on 127.0.0.1 (the standard library's, in a
thread): verified, atomic, cached downloads with mirrors; released files checked by size and full SHA-256;
one error for every missing file; weights folders made by ``download --dir`` used offline; zoo names
wherever a checkpoint path goes."""
import hashlib
import http.server
import os
import subprocess
import sys
import threading
import time

import numpy as np
import pytest
import torch
from safetensors.torch import save as safetensors_bytes

from ahiq import AHIQ, Scorer
from ahiq.cli import main, run
from ahiq.engine.testing import run_default_test, run_test
from ahiq.nn import downloads, zoo
from ahiq.registry.released import PIPAL_FILE, Released
from ahiq.registry.variants import CNNS, VITS
from conftest import ROOT, TINY

PAYLOAD = np.random.default_rng(0).bytes(3 * 2**20 + 123)  # a few chunks of the download loop
DIGEST = hashlib.sha256(PAYLOAD).hexdigest()


class Server:
    """Serves ``files`` (name -> bytes) whole at /good/<name>; cut after half its bytes at /dies/<name>; as a
    web page at /page/<name>; at /timm/<tag>/resolve/main/model.safetensors as the Hugging Face hub does
    (HF_ENDPOINT); anything else is a 404. Counts the requests; waits ``delay`` seconds before each answer."""

    def __init__(self, files=None, delay=0.0):
        self.files = files if files is not None else {}
        self.requests = []
        self.delay = delay
        served = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self):
                served.requests.append(self.path)
                time.sleep(served.delay)
                parts = self.path.split("/")
                kind, name = parts[1], parts[2] if parts[1] == "timm" else parts[-1]
                payload = served.files.get(name, PAYLOAD if not served.files else None)
                if kind not in ("good", "dies", "page", "timm") or payload is None:
                    self.send_error(404)
                    return
                self.send_response(200)
                self.send_header("Content-Type", "text/html" if kind == "page" else "application/octet-stream")
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload[:len(payload) // 2] if kind == "dies" else payload)

            def log_message(self, *args):
                pass

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def server():
    served = Server()
    yield served
    served.close()


@pytest.fixture(autouse=True)
def cache(tmp_path, monkeypatch):
    """Empty caches (torch's hub folder, Hugging Face's), no weights folder, the network allowed."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf"))
    for name in ("AHIQ_WEIGHTS", "HF_HUB_OFFLINE", "HF_ENDPOINT"):
        monkeypatch.delenv(name, raising=False)
    return tmp_path / "torch" / "hub" / "checkpoints"


def entry(server, *kinds, digest=DIGEST, size=len(PAYLOAD), name="test"):
    file = f"AHIQ_test-{DIGEST[:8]}.pth"
    return Released(name=name, summary="test model", patch_size=8, file=zoo.WeightFile(
        file, tuple(f"{server.url}/{kind}/{file}" for kind in kinds), sha256=digest, size=size))


def test_first_use_downloads_verifies_and_caches_the_second_touches_no_network(server, cache):
    model = entry(server, "good")
    path, = downloads.locate([model.file], progress=False)
    assert path == cache / model.file.name and path.read_bytes() == PAYLOAD
    assert len(server.requests) == 1 and sorted(p.name for p in cache.iterdir()) == [f".{path.name}.sha256", path.name]
    server.close()  # no network at all the second time
    assert downloads.locate([model.file], progress=False) == [path]


def test_a_wrong_digest_is_refused_naming_both_and_nothing_is_cached(server, cache):
    model = entry(server, "good", digest="0123abcd" + DIGEST[8:])
    with pytest.raises(downloads.DownloadError) as error:
        downloads.locate([model.file], progress=False)
    assert f"SHA-256 {DIGEST} ({len(PAYLOAD)} bytes), expected 0123abcd{DIGEST[8:]} ({len(PAYLOAD)} bytes)" in str(error.value)
    assert list(cache.iterdir()) == []


def test_a_mirror_dying_mid_file_leaves_nothing_and_the_next_mirror_is_used(server, cache):
    model = entry(server, "dies", "page", "good")
    path, = downloads.locate([model.file], progress=False)
    assert path.read_bytes() == PAYLOAD and sorted(p.name for p in cache.iterdir()) == [f".{path.name}.sha256", path.name]
    assert [r.split("/")[1] for r in server.requests] == ["dies", "page", "good"]


def test_every_mirror_failing_is_one_line_naming_the_file_the_urls_and_the_place(server, cache, monkeypatch, capsys):
    model = entry(server, "dies", "missing")
    monkeypatch.setitem(zoo.RELEASED, "test", model)
    code = main(["download", "test", "--dir", str(cache.parent / "d")])
    err = capsys.readouterr().err
    assert code == 2 and len(err.strip().splitlines()) == 1 and "Traceback" not in err, err
    assert err.startswith(f"error: missing weight files: {model.file.name}, ")
    assert f"{model.file.urls[0]} (the connection closed after" in err and f"{model.file.urls[1]} (HTTP 404" in err
    assert f"put its files in {cache.parent / 'd'}" in err and not (cache.parent / "d").exists()  # no empty folder left


def test_no_network_and_an_empty_cache_is_one_error_naming_every_file_each_server_tried_once(cache, monkeypatch):
    """Nothing listens on the port (connection refused, as offline): the released file and both backbones
    are named in one error, and the server is asked once, not once per file or with retries."""
    closed = Server()
    closed.close()
    monkeypatch.setitem(zoo.RELEASED, "pipal", entry(closed, "good", name="pipal"))
    monkeypatch.setenv("HF_ENDPOINT", closed.url)
    start = time.monotonic()
    with pytest.raises(downloads.DownloadError) as error:
        AHIQ.from_pretrained("pipal")
    message = str(error.value)
    assert time.monotonic() - start < 5
    for file in zoo.released_files(zoo.RELEASED["pipal"]):
        assert file.described() in message
    assert message.count("127.0.0.1") == 1 and "refused" in message.lower()
    assert f"put its files in {cache}" in message and "python -m ahiq download --dir D pipal," in message


def test_offline_the_command_line_reports_every_missing_file_in_one_line_at_once(tmp_path, server):
    """HF_HUB_OFFLINE set: the hub (here a local server) is never asked, so no retries delay the answer."""
    env = {**os.environ, "TORCH_HOME": str(tmp_path / "torch"), "HF_HUB_CACHE": str(tmp_path / "hf"),
           "HF_HUB_OFFLINE": "1", "HF_ENDPOINT": server.url}
    env.pop("AHIQ_WEIGHTS", None)
    image = tmp_path / "a.png"
    import cv2

    cv2.imwrite(str(image), np.zeros((224, 224, 3), np.uint8))
    done = subprocess.run([sys.executable, "-m", "ahiq", "score", "--dist", str(image), "--ref", str(image)],
                          env=env, capture_output=True, text=True, cwd=ROOT)
    lines = done.stderr.strip().splitlines()
    assert done.returncode == 2 and len(lines) == 1, done.stderr
    assert "AHIQ_vit_p8_epoch33-da3ea303.pth" in lines[0] and "resnet50_a1_0-14fe96d1.pth" in lines[0]
    assert "vit_base_patch8_224.augreg_in21k_ft_in1k.safetensors" in lines[0] and "HF_HUB_OFFLINE is set" in lines[0]
    assert server.requests == []


def test_download_into_a_file_or_an_uncreatable_folder_is_one_line(tmp_path, cache, monkeypatch, capsys):
    """Before any file is looked for; and without --dir, the cache it fills is named once among the places."""
    (tmp_path / "a.png").write_bytes(b"x")
    for folder, message in ((tmp_path / "a.png", f"error: weights folder {tmp_path / 'a.png'} is a file; give a folder"),
                            (tmp_path / "a.png" / "sub", f"error: weights folder {tmp_path / 'a.png' / 'sub'}: "
                                                          f"{tmp_path / 'a.png'} is a file; give a folder")):
        assert main(["download", "--dir", str(folder), "pipal"]) == 2
        err = capsys.readouterr().err
        assert err.startswith(message) and len(err.strip().splitlines()) == 1, err
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert main(["download", "pipal"]) == 2
    err = capsys.readouterr().err
    assert f"looked in {cache}, {cache.parent / 'pyiqa'} and Hugging Face's cache; not downloaded: HF_HUB_OFFLINE is set" in err, err


def test_the_released_entry_carries_the_full_digest_and_size_of_the_published_file():
    pipal = zoo.RELEASED["pipal"].file
    assert (pipal.name, pipal.size) == ("AHIQ_vit_p8_epoch33-da3ea303.pth", 326044337)
    assert pipal.sha256 == "da3ea303b365ef71f4bbe41eba56f0ab3371c697d9c959649904dc9dd0a08b85"
    assert pipal.urls[0].startswith("https://github.com/chaofengc/IQA-PyTorch/releases/download/v0.1-weights/")
    assert any("1Nk-IpjnDNXbWacoh3T69wkSYhYYWip2W" in url for url in pipal.urls)


def test_every_released_name_carries_the_prefix_of_its_digest():
    """torch.hub's convention, name-<first hex digits of the SHA-256>.pth, for every file with a digest."""
    for model in zoo.RELEASED.values():
        assert model.file.sha256.startswith(model.file.name.rsplit("-", 1)[1].split(".")[0])


@pytest.mark.parametrize("bytes_", ["other", "truncated"])
def test_a_file_with_other_bytes_under_the_released_name_is_refused_and_nothing_is_loaded(cache, bytes_, tmp_path,
                                                                                         monkeypatch, capsys):
    cache.mkdir(parents=True)
    planted = cache / PIPAL_FILE
    planted.write_bytes(PAYLOAD if bytes_ == "other" else PAYLOAD[:1000])

    def no_load(*args):
        raise AssertionError("a file that failed verification was loaded")

    monkeypatch.setattr("ahiq.nn.pretrained.read_weight_file", no_load)
    image = tmp_path / "a.png"
    import cv2

    cv2.imwrite(str(image), np.zeros((224, 224, 3), np.uint8))
    code = main(["score", "--dist", str(image), "--ref", str(image)])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1, err
    actual = hashlib.sha256(planted.read_bytes()).hexdigest()
    assert err[0] == (f"error: {planted} is not the released {PIPAL_FILE}: SHA-256 {actual} "
                      f"({planted.stat().st_size} bytes), expected {zoo.RELEASED['pipal'].file.sha256} (326044337 bytes); "
                      f"nothing was loaded. Delete it, then run python -m ahiq download pipal (with --dir for a "
                      f"weights folder)")


def test_the_digest_is_computed_once_per_file_identity(cache, monkeypatch):
    cache.mkdir(parents=True)
    model = Released(name="test", summary="", patch_size=8,
                     file=zoo.WeightFile(f"AHIQ_test-{DIGEST[:8]}.pth", sha256=DIGEST, size=len(PAYLOAD)))
    path = cache / model.file.name
    path.write_bytes(PAYLOAD)
    hashed = []
    real = downloads.sha256_of
    monkeypatch.setattr(downloads, "sha256_of", lambda p: hashed.append(p) or real(p))
    assert downloads.locate([model.file]) == [path] and len(hashed) == 1
    assert downloads.locate([model.file]) == [path] and len(hashed) == 1  # remembered beside it
    changed = bytearray(PAYLOAD)
    changed[7] ^= 1
    path.write_bytes(bytes(changed))  # same size, another modification time: verified again, and refused
    with pytest.raises(downloads.VerificationError, match=f"SHA-256 {hashlib.sha256(changed).hexdigest()}"):
        downloads.locate([model.file])
    assert len(hashed) == 2


def test_the_original_backbone_files_are_found_where_timm_054_left_them(cache):
    """The official code's timm downloaded the AugReg .npz and resnet50_a1_0-14fe96d1.pth into torch's hub
    cache: found there under those names, without the network."""
    cache.mkdir(parents=True)
    for tag in (VITS[8].tag, CNNS["resnet50"].tag):
        (cache / zoo.BACKBONES[tag].also_named[0]).write_bytes(b"weights")
    found = downloads.locate([zoo.BACKBONES[VITS[8].tag], zoo.BACKBONES[CNNS["resnet50"].tag]])
    assert [p.name for p in found] == [zoo.BACKBONES[VITS[8].tag].also_named[0], "resnet50_a1_0-14fe96d1.pth"]


def test_a_released_file_in_pyiqas_folder_is_used_verified_without_a_download(server, cache):
    """pyiqa (0.1.13 and later) keeps the released file in torch.hub.get_dir()/pyiqa: found there, its digest
    checked, and no server asked; other bytes under the name are refused as anywhere else."""
    model = entry(server, "good")
    pyiqa = cache.parent / "pyiqa"
    pyiqa.mkdir(parents=True)
    (pyiqa / model.file.name).write_bytes(PAYLOAD)
    assert zoo.cache_dirs() == [cache, pyiqa]
    assert downloads.locate([model.file], progress=False) == [pyiqa / model.file.name] and server.requests == []
    (pyiqa / model.file.name).write_bytes(PAYLOAD[::-1])
    with pytest.raises(downloads.VerificationError, match=f"{pyiqa / model.file.name} is not the released"):
        downloads.locate([model.file], progress=False)


def test_a_weights_folder_is_the_only_place_looked_and_the_network_is_not_used(server, tmp_path, monkeypatch):
    monkeypatch.setitem(zoo.RELEASED, "test", entry(server, "good"))
    (tmp_path / "w").mkdir()
    monkeypatch.setenv("AHIQ_WEIGHTS", str(tmp_path / "w"))
    with pytest.raises(downloads.DownloadError, match=f"looked in the weights folder {tmp_path / 'w'}"):
        downloads.locate([zoo.RELEASED["test"].file])
    assert server.requests == []
    with pytest.raises(FileNotFoundError, match=f"weights folder {tmp_path / 'none'} is not a folder"):
        downloads.locate([zoo.RELEASED["test"].file], tmp_path / "none")


# ---- the released model, end to end: a weights folder made by download --dir serves score and test.py offline

@pytest.fixture
def released(tmp_path_factory, monkeypatch):
    """A full-size released model with random weights (official format, with its optimiser state), its two
    backbones as timm safetensors files, all served by a local server as their real sources serve them
    (the model from a mirror, the backbones from the Hugging Face hub at HF_ENDPOINT)."""
    from ahiq.nn.official import random_official_setup

    folder = tmp_path_factory.mktemp("release")
    reference, _, checkpoint = random_official_setup(8, folder)
    files = {PIPAL_FILE: checkpoint.read_bytes()}
    for tag, name in ((VITS[8].tag, "vit.pth"), (CNNS["resnet50"].tag, "resnet.pth")):
        files[tag] = safetensors_bytes(torch.load(folder / name, weights_only=True))
    served = Server(files)
    payload = files[PIPAL_FILE]
    monkeypatch.setitem(zoo.RELEASED, "pipal", Released(name="pipal", summary="test", patch_size=8, file=zoo.WeightFile(
        PIPAL_FILE, (f"{served.url}/good/{PIPAL_FILE}",), sha256=hashlib.sha256(payload).hexdigest(),
        size=len(payload))))
    monkeypatch.setenv("HF_ENDPOINT", served.url)
    yield reference, served
    served.close()


@pytest.mark.slow
def test_download_dir_then_score_and_test_py_offline_from_that_folder(released, tmp_path, monkeypatch, capsys):
    from ahiq.data.synthetic import distort, reference_image
    import cv2

    reference, served = released
    weights = tmp_path / "weights"
    assert main(["download", "--dir", str(weights)]) == 0
    assert sorted(p.name for p in weights.iterdir() if not p.name.startswith(".")) == sorted(
        f.name for f in zoo.released_files(zoo.RELEASED["pipal"]))
    served.close()  # offline from here on
    asked = len(served.requests)
    rng = np.random.default_rng(0)
    ref = reference_image(rng, 224)
    dist = distort(ref, "blur", 3, rng)
    for name, image in (("r.png", ref), ("d.png", dist)):
        cv2.imwrite(str(tmp_path / name), image[..., ::-1])
    capsys.readouterr()
    monkeypatch.setenv("AHIQ_WEIGHTS", str(weights))
    assert main(["score", "--dist", str(tmp_path / "d.png"), "--ref", str(tmp_path / "r.png"), "--crops", "centre"]) == 0
    printed = float(capsys.readouterr().out.strip().split(",")[1])
    as_input = lambda image: torch.from_numpy(image.copy()).permute(2, 0, 1)[None].float() / 255
    with torch.no_grad():
        expected = reference(as_input(dist), as_input(ref)).item()
    assert printed == pytest.approx(expected, abs=1e-5)
    monkeypatch.delenv("AHIQ_WEIGHTS")
    monkeypatch.chdir(tmp_path)
    rows = [f"r.png,d{level}.png,{30 - level}" for level in range(5)]  # a labelled test part of five pairs
    for level in range(5):
        cv2.imwrite(str(tmp_path / f"d{level}.png"), distort(ref, "blur", level, rng)[..., ::-1])
    (tmp_path / "labels.csv").write_text("ref,dist,mos\n" + "\n".join(rows) + "\n")
    full = {"img_size": 224, "vit_dim": 768, "vit_heads": 12, "cnn_width": 64, "fusion_hidden": 512, "head_dim": 256,
            "head_hidden": 1024}
    args = ["--opt", str(ROOT / "options" / "demo.yaml"), "--weights", str(weights), "data.dataset=csv",
            f"data.root={tmp_path}", "data.options={labels: labels.csv}", "data.split.ratios=[0, 0, 1]",
            "test.checkpoint=pipal", "test.crops=centre", "model.vit_pretrained=true", "model.cnn_pretrained=true",
            "model.freeze_backbones=true", *[f"model.{k}={v}" for k, v in full.items()]]
    assert run("test", run_test, args) == 0
    assert any(line.startswith("SROCC ") for line in capsys.readouterr().out.splitlines())
    assert len(served.requests) == asked


def test_a_weights_folder_is_a_checkpoint_too(released, tmp_path):
    weights = tmp_path / "weights"
    downloads.download(["pipal"], weights, progress=False)
    released[1].close()
    a = AHIQ.from_pretrained(weights)
    b = AHIQ.from_pretrained("pipal", weights=weights)
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))


# ---- zoo names wherever a checkpoint path goes ---------------------------------------------------------------

@pytest.fixture
def planted(cache, monkeypatch):
    """A tiny project checkpoint (backbones included) planted in the cache as the released model."""
    cache.mkdir(parents=True)
    path = cache / PIPAL_FILE
    AHIQ(8, False, False, **TINY, freeze_backbones=False).save_checkpoint(path)
    monkeypatch.setitem(zoo.RELEASED, "pipal", Released(name="pipal", summary="test", patch_size=8, file=zoo.WeightFile(
        PIPAL_FILE, sha256=downloads.sha256_of(path), size=path.stat().st_size)))
    return path


def test_zoo_names_work_where_paths_do(planted, tmp_path):
    from ahiq.data.synthetic import reference_image
    import cv2

    image = reference_image(np.random.default_rng(0), 64)
    cv2.imwrite(str(tmp_path / "r.png"), image)
    cv2.imwrite(str(tmp_path / "d.png"), image[::-1].copy())
    by_name = Scorer(crops="whole", vit_pretrained=False, cnn_pretrained=False).score(tmp_path / "d.png", tmp_path / "r.png")
    by_path = Scorer(planted, crops="whole", vit_pretrained=False, cnn_pretrained=False).score(tmp_path / "d.png",
                                                                                              tmp_path / "r.png")
    assert by_name == by_path


def test_bare_test_py_tests_the_released_model_before_training(planted, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    args = [f"data.root={tmp_path / 'data'}", "data.options={references: 5, size: 72}", "test.num_crops=1",
            "model.vit_pretrained=false", "model.cnn_pretrained=false"]
    code = run("test", lambda opt: None, ["--opt", str(ROOT / "options" / "demo.yaml"), *args],
               default=(ROOT / "options" / "demo.yaml", run_default_test))
    assert code == 0 and capsys.readouterr().out == ""  # --opt given: the given action
    code = run("test", lambda opt: None, args, default=(ROOT / "options" / "demo.yaml", run_default_test))
    out = capsys.readouterr().out.splitlines()
    assert code == 0, out
    assert out[0] == "testing the released model 'pipal' (no checkpoints/demo/best.pth yet: train with python " \
                     "train.py --opt ... first to test your own)"
    assert any(line.startswith("SROCC ") and "(25 pairs)" in line for line in out), out


def test_score_uses_the_released_model_by_default(planted, tmp_path, capsys):
    from ahiq.data.synthetic import reference_image
    import cv2

    image = reference_image(np.random.default_rng(0), 64)
    cv2.imwrite(str(tmp_path / "r.png"), image)
    cv2.imwrite(str(tmp_path / "d.png"), image[:, ::-1].copy())
    args = ["score", "--dist", str(tmp_path / "d.png"), "--ref", str(tmp_path / "r.png"), "--crops", "whole",
            "--vit-pretrained", "false", "--cnn-pretrained", "false"]
    assert main(args) == 0
    default = capsys.readouterr().out
    assert main([*args, "--checkpoint", str(planted)]) == 0
    assert capsys.readouterr().out == default and default.startswith("d.png,")


def test_zoo_lists_every_file_and_where_it_is(planted, capsys):
    assert main(["zoo"]) == 0
    listing = capsys.readouterr().out
    assert f"pipal: test; ViT-B/8; at {planted}" in listing
    assert "resnet50.a1_in1k: backbone; missing (resnet50.a1_in1k.safetensors (or resnet50_a1_0-14fe96d1.pth))" in listing


def test_processes_downloading_at_once_fetch_each_file_once(tmp_path):
    """Two processes (as torchrun starts them) missing the same two backbones at the same moment, the hub
    slow to answer: one downloads while the other waits on the folder's lock; both then have the files, and
    the hub was asked for each file once."""
    files = {tag: safetensors_bytes({"w": torch.full((4,), float(i))}) for i, tag in enumerate(zoo.BACKBONES)}
    served = Server(files, delay=2.0)
    tags = [VITS[8].tag, CNNS["resnet50"].tag]
    code = (f"from ahiq.nn import downloads, zoo; "
            f"print(*downloads.locate([zoo.BACKBONES[t] for t in {tags!r}], progress=False))")
    env = {**os.environ, "HF_ENDPOINT": served.url}
    try:
        processes = [subprocess.Popen([sys.executable, "-c", code], env=env, cwd=ROOT, stdout=subprocess.PIPE,
                                      stderr=subprocess.PIPE, text=True) for _ in range(2)]
        outs = [process.communicate(timeout=120) for process in processes]
    finally:
        served.close()
    assert all(process.returncode == 0 for process in processes), outs
    cache = tmp_path / "torch" / "hub" / "checkpoints"
    expected = " ".join(str(cache / zoo.BACKBONES[tag].name) for tag in tags)
    assert [out.strip() for out, _ in outs] == [expected, expected]
    assert sorted(served.requests) == sorted(f"/timm/{tag}/resolve/main/model.safetensors" for tag in tags)
    assert sum("waiting for another process's download" in err for _, err in outs) == 1, outs
    assert all((cache / zoo.BACKBONES[tag].name).read_bytes() == files[tag] for tag in tags)
    assert sorted(p.name for p in cache.iterdir()) == sorted(zoo.BACKBONES[tag].name for tag in tags)  # no lock left
