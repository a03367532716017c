"""The weight zoo against a real HTTP server on 127.0.0.1 (the standard library's, in a thread): verified,
atomic, cached downloads with mirrors; zoo names wherever a checkpoint path goes; the command line."""
import hashlib
import http.server
import threading

import numpy as np
import pytest
import torch

from ahiq import AHIQ, Scorer, zoo
from ahiq.__main__ import main
from ahiq.cli import run
from ahiq.evaluation import run_default_test
from conftest import ROOT, TINY

PAYLOAD = np.random.default_rng(0).bytes(3 * 2**20 + 123)  # a few chunks of the download loop
DIGEST = hashlib.sha256(PAYLOAD).hexdigest()


class Server:
    """Serves PAYLOAD whole at /good/<name>; cut after half its bytes at /dies/<name>; as a web page at
    /page/<name>; anything else is a 404. Counts the requests."""

    def __init__(self):
        self.requests = []
        served = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self):
                served.requests.append(self.path)
                kind = self.path.split("/")[1]
                if kind not in ("good", "dies", "page"):
                    self.send_error(404)
                    return
                self.send_response(200)
                self.send_header("Content-Type", "text/html" if kind == "page" else "application/octet-stream")
                self.send_header("Content-Length", str(len(PAYLOAD)))
                self.end_headers()
                self.wfile.write(PAYLOAD[:len(PAYLOAD) // 2] if kind == "dies" else PAYLOAD)

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


@pytest.fixture
def cache(tmp_path, monkeypatch):
    """An empty torch hub cache (TORCH_HOME moves it, as for torch.hub)."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    return tmp_path / "torch" / "hub" / "checkpoints"


def entry(server, *kinds, digest=DIGEST):
    file = f"AHIQ_test-{digest[:8]}.pth"
    return zoo.ZooModel(file, tuple(f"{server.url}/{kind}/{file}" for kind in kinds), 8, "test model")


def test_first_use_downloads_and_caches_the_second_touches_no_network(server, cache, monkeypatch):
    monkeypatch.setitem(zoo.ZOO, "test", entry(server, "good"))
    path = zoo.fetch("test", progress=False)
    assert path == cache / f"AHIQ_test-{DIGEST[:8]}.pth" and path.read_bytes() == PAYLOAD
    assert len(server.requests) == 1 and sorted(p.name for p in cache.iterdir()) == [path.name]
    server.close()  # no network at all the second time
    assert zoo.fetch("test", progress=False) == path


def test_a_wrong_hash_is_refused_and_nothing_is_cached(server, cache, monkeypatch, capsys):
    monkeypatch.setitem(zoo.ZOO, "test", entry(server, "good", digest="0123abcd" + DIGEST[8:]))
    with pytest.raises(zoo.DownloadError) as error:
        zoo.fetch("test", progress=False)
    assert f"SHA-256 {DIGEST}, expected 0123abcd...: not the released file" in str(error.value)
    assert list(cache.iterdir()) == []


def test_a_mirror_dying_mid_file_leaves_nothing_and_the_next_mirror_is_used(server, cache, monkeypatch):
    monkeypatch.setitem(zoo.ZOO, "test", entry(server, "dies", "page", "good"))
    path = zoo.fetch("test", progress=False)
    assert path.read_bytes() == PAYLOAD and [p.name for p in cache.iterdir()] == [path.name]
    assert [r.split("/")[1] for r in server.requests] == ["dies", "page", "good"]


def test_every_mirror_failing_is_one_line_naming_the_file_the_urls_and_the_place(server, cache, monkeypatch, capsys):
    model = entry(server, "dies", "missing")
    monkeypatch.setitem(zoo.ZOO, "test", model)
    code = main(["download", "test"])
    err = capsys.readouterr().err
    assert code == 2 and len(err.strip().splitlines()) == 1 and "Traceback" not in err, err
    assert err.startswith(f"error: could not download {model.file}: tried {model.urls[0]} (")
    assert f"{model.urls[1]} (HTTP 404" in err and f"Put the file at {cache / model.file} " in err
    assert list(cache.iterdir()) == []


def test_unreachable_server_is_the_same_one_line(cache, monkeypatch, capsys):
    """Nothing listens on the port: connection refused, as offline."""
    closed = Server()
    closed.close()
    monkeypatch.setitem(zoo.ZOO, "test", entry(closed, "good"))
    code = main(["download", "test"])
    err = capsys.readouterr().err
    assert code == 2 and "could not download AHIQ_test-" in err and "refused" in err.lower(), err


def test_download_fetches_the_model_and_asks_timm_for_both_backbones(server, cache, monkeypatch, capsys):
    monkeypatch.setitem(zoo.ZOO, "test", entry(server, "good"))
    asked = []
    monkeypatch.setattr("ahiq.backbones.create_timm_model", lambda tag, pretrained: asked.append((tag, pretrained)))
    assert main(["download", "test"]) == 0
    out = capsys.readouterr().out
    assert f"test: {cache / zoo.ZOO['test'].file}" in out
    assert asked == [("vit_base_patch8_224.augreg_in21k_ft_in1k", True), ("resnet50.a1_in1k", True)]
    assert main(["zoo"]) == 0
    listing = capsys.readouterr().out
    assert f"test: test model; ViT-B/8; cached at {cache / zoo.ZOO['test'].file}" in listing
    assert "pipal: ViT-B/8 + ResNet50, trained on PIPAL" in listing and "not cached (would be " in listing


def test_the_released_entry_is_torch_hubs_convention():
    pipal = zoo.ZOO["pipal"]
    assert pipal.file == "AHIQ_vit_p8_epoch33-da3ea303.pth" and pipal.sha256 == "da3ea303" and pipal.patch_size == 8
    assert pipal.urls[0].startswith("https://github.com/chaofengc/IQA-PyTorch/releases/download/v0.1-weights/")
    assert any("1Nk-IpjnDNXbWacoh3T69wkSYhYYWip2W" in url for url in pipal.urls)


@pytest.fixture
def planted(cache, tmp_path):
    """A tiny project checkpoint (backbones included) planted in the cache under the released name."""
    cache.mkdir(parents=True)
    AHIQ(8, False, False, **TINY, freeze_backbones=False).save_checkpoint(cache / zoo.PIPAL_FILE)
    return cache / zoo.PIPAL_FILE


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
    model = AHIQ.from_pretrained("pipal", vit_pretrained=False, cnn_pretrained=False)
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(),
                                                  AHIQ.from_checkpoint(planted).state_dict().values()))


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
