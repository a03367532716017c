"""python -m ahiq app: the limits and messages of the page's functions (here, without Gradio), then the real
server (marked slow; it needs the app extra): its /score endpoint called by a Gradio client against the command
line's score, bad uploads answered while it keeps serving, no file but the uploads served, nothing sent
anywhere, and the page itself in headless Chromium (Debian's chromium and chromium-driver, driven by Selenium).

AHIQ_SCREENSHOT=docs/app.png python -m pytest tests/test_app.py -m slow -k chromium  rewrites the docs' picture."""
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import cv2
import numpy as np
import pytest

from ahiq.app import MAX_DISTORTED, MAX_PIXELS, PageError, check_upload, upload_name
from ahiq.data.synthetic import distort, reference_image
from conftest import ROOT


def test_an_uploads_name_is_its_own_file_name_never_a_path():
    assert upload_name({"path": "/tmp/gradio/ab/x.png", "orig_name": "photo (1).png"}) == "photo (1).png"
    assert upload_name({"path": "/tmp/gradio/ab/x.png", "orig_name": "../../etc/passwd"}) == "passwd"
    assert upload_name({"path": "/tmp/gradio/ab/x.png", "orig_name": "C:\\Users\\me\\ref.bmp"}) == "ref.bmp"
    assert upload_name({"path": "/tmp/gradio/ab/x.png", "orig_name": ".."}) == "image"
    assert upload_name({"path": "/tmp/gradio/ab/blob.png", "orig_name": None}) == "blob.png"


def _png_header(width: int, height: int) -> bytes:
    """A PNG claiming ``width`` x ``height`` whose pixel data is 64 bytes: its header is all a size check may read."""
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0))
    return b"\x89PNG\r\n\x1a\n" + header + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")


def test_an_upload_over_the_pixel_limit_is_refused_from_its_header(tmp_path):
    """The size comes from the header: a file that claims 5000 x 5000 pixels (and holds none) is refused
    before anything decodes it; one of exactly MAX_PIXELS is not refused for its size."""
    claim = tmp_path / "claims.png"
    claim.write_bytes(_png_header(5000, 5000))
    with pytest.raises(PageError, match=r"^photo\.png has 5000x5000 = 25\.0 megapixels: this page takes images of "
                                        r"at most 12 megapixels"):
        check_upload(claim, "photo.png")
    claim.write_bytes(_png_header(MAX_PIXELS // 3000, 3000))
    check_upload(claim, "photo.png")
    claim.write_bytes(_png_header(200_000, 200_000))  # past PIL's own decompression-bomb limit
    with pytest.raises(PageError, match="has too many pixels"):
        check_upload(claim, "photo.png")
    text = tmp_path / "notes.png"
    text.write_text("not an image")
    with pytest.raises(PageError, match=r"^notes\.png is not an image this page can read"):
        check_upload(text, "notes.png")


def test_the_app_command_without_gradio_says_how_to_install_it(tiny_checkpoint, monkeypatch, capsys):
    from ahiq.cli import main

    monkeypatch.setitem(sys.modules, "gradio", None)  # import gradio raises ImportError
    assert main(["app", "--checkpoint", str(tiny_checkpoint), "--port", "1"]) == 2
    assert capsys.readouterr().err == ("error: the web page needs the optional package gradio: pip install -e "
                                       "'.[app]'\n")


def test_the_app_command_refuses_a_baseline_that_cannot_run_here(tmp_path, capsys):
    """A learned baseline whose weights are not in the weights folder is refused before any model loads (the page
    never downloads of its own accord)."""
    pytest.importorskip("gradio", reason="the app extra (pip install -e '.[app]') is not installed")
    pytest.importorskip("piq", reason="piq (the app extra) is not installed")
    from ahiq.cli import main

    assert main(["app", "--baselines", "psnr", "lpips", "--weights", str(tmp_path)]) == 2
    assert capsys.readouterr().err == ("error: --baselines lpips needs vgg16-397923af.pth, lpips_weights.pt, not "
                                       "found here: python -m ahiq download lpips\n")


def test_the_app_command_refuses_an_address_it_cannot_listen_on_before_loading_a_model(tmp_path, capsys):
    """A port another server holds, a host that is not this machine's: one line, exit 2, no model sought (the
    weights folder is empty: loading would fail with another message)."""
    pytest.importorskip("gradio", reason="the app extra (pip install -e '.[app]') is not installed")
    from ahiq.cli import main

    with socket.socket() as held:
        held.bind(("127.0.0.1", 0))
        held.listen()
        port = held.getsockname()[1]
        assert main(["app", "--port", str(port), "--weights", str(tmp_path)]) == 2
        err = capsys.readouterr().err
        assert err.startswith(f"error: --host 127.0.0.1 --port {port}: the page cannot listen there (Address already "
                              f"in use); give another --port") and err.count("\n") == 1, err
    assert main(["app", "--host", "192.0.2.1", "--weights", str(tmp_path)]) == 2  # TEST-NET-1: nobody's address
    err = capsys.readouterr().err
    assert "error: --host 192.0.2.1 --port 7860: the page cannot listen there (Cannot assign requested address)" in err


# ---- the real server -------------------------------------------------------------------------------------

def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Recorder:
    """A listener that records every connection made to it: the server's proxy for everything not on
    127.0.0.1, so that anything it sent elsewhere of its own accord (telemetry, a version check, a font) is
    counted here."""

    def __init__(self):
        self.socket = socket.socket()
        self.socket.bind(("127.0.0.1", 0))
        self.socket.listen()
        self.requests: list[bytes] = []
        threading.Thread(target=self._serve, daemon=True).start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.socket.getsockname()[1]}"

    def _serve(self):
        while True:
            try:
                connection, _ = self.socket.accept()
            except OSError:
                return
            with connection:
                connection.settimeout(2)
                try:
                    self.requests.append(connection.recv(200))
                except OSError:
                    self.requests.append(b"?")


def _write(path: Path, image: np.ndarray) -> str:
    cv2.imwrite(str(path), image[..., ::-1])
    return str(path)


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    folder = tmp_path_factory.mktemp("uploads")
    rng = np.random.default_rng(1)
    ref = reference_image(rng, 100)
    files = {"ref": _write(folder / "ref.png", ref),
             "noise": _write(folder / "noise.png", distort(ref, "noise", 3, rng)),
             "blur": _write(folder / "blur.png", distort(ref, "blur", 1, rng)),
             "other_size": _write(folder / "wide.png", reference_image(rng, 120)),
             "small": _write(folder / "small.png", ref[:40, :40]),
             "small_ref": _write(folder / "small_ref.png", ref[:40, :40]),
             "large": _write(folder / "large.png", np.zeros((3100, 4000, 3), np.uint8))}
    (folder / "notes.png").write_text("not an image")
    files["text"] = str(folder / "notes.png")
    return files


MODEL = ["--vit-pretrained", "false", "--cnn-pretrained", "false", "--crops", "random", "--num-crops", "4",
         "--precision", "fp32"]


@pytest.fixture(scope="module")
def server(tiny_checkpoint, tmp_path_factory):
    """python -m ahiq app on a tiny checkpoint, its proxy a Recorder; yields (url, recorder, log file)."""
    pytest.importorskip("gradio", reason="the app extra (pip install -e '.[app]') is not installed")
    pytest.importorskip("gradio_client", reason="the app extra (pip install -e '.[app]') is not installed")
    recorder, port = Recorder(), _free_port()
    log = tmp_path_factory.mktemp("server") / "server.log"
    env = {**os.environ, "HTTP_PROXY": recorder.url, "HTTPS_PROXY": recorder.url, "http_proxy": recorder.url,
           "https_proxy": recorder.url, "NO_PROXY": "127.0.0.1,localhost", "no_proxy": "127.0.0.1,localhost"}
    with open(log, "w") as out:
        process = subprocess.Popen([sys.executable, "-m", "ahiq", "app", "--checkpoint", str(tiny_checkpoint), *MODEL,
                                    "--port", str(port)], cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT)
    try:
        from conftest import wait_for_line

        wait_for_line(process, log, "Running on local URL", timeout=240)
        yield f"http://127.0.0.1:{port}", recorder, log
    finally:
        process.terminate()
        process.wait(timeout=60)


@pytest.mark.parametrize("stop", [signal.SIGTERM, signal.SIGINT])
def test_a_stop_signal_at_any_moment_of_serving_ends_in_stopped(stop):
    """Also one that comes before Gradio's launch waits for it (the KeyboardInterrupt then leaves launch): the
    same one line and status, and the previous handlers back."""
    if threading.current_thread() is not threading.main_thread():
        pytest.skip("signals are handled in the main thread only")
    from ahiq.app import stopped_by_signals
    from ahiq.runtime.signals import Stopped

    before = signal.getsignal(stop)
    with pytest.raises(Stopped) as stopped:
        with stopped_by_signals():
            os.kill(os.getpid(), stop)
            time.sleep(5)  # the handler raises here
    assert (stopped.value.exit_code, str(stopped.value)) == (128 + stop, f"ahiq app: stopped on {stop.name}; the "
                                                                         f"server is closed")
    assert signal.getsignal(stop) is before


@pytest.mark.slow
@pytest.mark.parametrize("stop", [signal.SIGTERM, signal.SIGINT])
def test_a_stop_signal_closes_the_server_in_one_line_and_leaves_nothing(stop, tiny_checkpoint, tmp_path):
    """SIGTERM (a service manager's stop) or Ctrl-C: the server closes, one line, 128 + the signal's number, and
    the examples' folder it made is removed (TMPDIR is the test's, so nothing else is counted)."""
    pytest.importorskip("gradio", reason="the app extra (pip install -e '.[app]') is not installed")
    log, port = tmp_path / "server.log", _free_port()
    with open(log, "w") as out:  # its own session: Ctrl-C reaches it as from its terminal, not through pytest
        process = subprocess.Popen([sys.executable, "-m", "ahiq", "app", "--checkpoint", str(tiny_checkpoint), *MODEL,
                                    "--port", str(port)], cwd=ROOT, env={**os.environ, "TMPDIR": str(tmp_path)},
                                   stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        from conftest import wait_for_line

        wait_for_line(process, log, "Running on local URL", timeout=240)
        assert len(list(tmp_path.glob("ahiq-examples-*"))) == 1
        process.send_signal(stop)
        assert process.wait(timeout=60) == 128 + stop
    finally:
        process.kill()
    said = log.read_text()
    assert said.splitlines()[-1] == f"ahiq app: stopped on {stop.name}; the server is closed" and "Traceback" not in said
    assert list(tmp_path.glob("ahiq-examples-*")) == []


def command_line_scores(checkpoint, dists: list[str], ref: str, out: Path) -> dict[str, str]:
    """python -m ahiq score's scores (as its CSV writes them) of ``dists`` against ``ref``, by file name."""
    folder = out.parent / "dists"
    folder.mkdir(exist_ok=True)
    for path in dists:
        shutil.copy(path, folder)
    subprocess.run([sys.executable, "-m", "ahiq", "score", "--checkpoint", str(checkpoint), *MODEL, "--dist",
                    str(folder), "--ref", ref, "--out", str(out)], cwd=ROOT, check=True, capture_output=True)
    rows = [line.split(",") for line in out.read_text().splitlines()[1:]]
    return {Path(dist).name: score for dist, _, score in rows}


@pytest.fixture(scope="module")
def expected(tiny_checkpoint, images, tmp_path_factory):
    return command_line_scores(tiny_checkpoint, [images["noise"], images["blur"]], images["ref"],
                               tmp_path_factory.mktemp("cli") / "scores.csv")


@pytest.mark.slow
def test_the_score_endpoint_gives_the_command_lines_score(server, images, expected):
    from gradio_client import Client, handle_file

    client = Client(server[0], verbose=False)
    for name in ("noise", "blur"):
        score = client.predict(handle_file(images[name]), handle_file(images["ref"]), api_name="/score")
        assert f"{score:.6f}" == expected[f"{name}.png"]
    # several users at once: queued, one scored at a time, each answered with its own pair's score
    results = {}
    threads = [threading.Thread(target=lambda n=n: results.update({n: Client(server[0], verbose=False).predict(
        handle_file(images[n]), handle_file(images["ref"]), api_name="/score")})) for n in ("noise", "blur", "noise")]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    assert {n: f"{v:.6f}" for n, v in results.items()} == {"noise": expected["noise.png"],
                                                          "blur": expected["blur.png"]}


@pytest.mark.slow
def test_bad_uploads_are_answered_in_one_line_and_the_server_keeps_scoring(server, images, expected):
    from gradio_client import Client, handle_file
    from gradio_client.exceptions import AppError

    client = Client(server[0], verbose=False)
    bad = {("text", "ref"): "notes.png is not an image this page can read (PNG, JPEG, BMP, TIFF or WebP)",
           ("other_size", "ref"): "wide.png is 120x120 but its reference ref.png is 100x100; fix or remove this "
                                  "pair, then run again",
           ("small", "small_ref"): "small.png is 40x40, smaller than the 64x64 crop; fix or remove this pair, then "
                                   "run again",
           ("noise", "large"): "large.png has 4000x3100 = 12.4 megapixels: this page takes images of at most 12 "
                               "megapixels (python -m ahiq score takes any size)"}
    for (dist, ref), message in bad.items():
        with pytest.raises(AppError) as caught:
            client.predict(handle_file(images[dist]), handle_file(images[ref]), api_name="/score")
        assert str(caught.value) == message
    with pytest.raises(AppError, match=f"^{MAX_DISTORTED + 1} distorted images: this page scores at most "
                                       f"{MAX_DISTORTED} at once$"):
        client.predict([{"image": handle_file(images["noise"])}] * (MAX_DISTORTED + 1), handle_file(images["ref"]),
                       api_name="/rank")
    score = client.predict(handle_file(images["noise"]), handle_file(images["ref"]), api_name="/score")
    assert f"{score:.6f}" == expected["noise.png"]
    assert "Traceback" not in server[2].read_text()  # answered, not crashed


@pytest.mark.slow
def test_the_rank_endpoint_ranks_with_the_baselines_and_maps(server, images, expected):
    from gradio_client import Client, handle_file

    summary, table, panels = Client(server[0], verbose=False).predict(
        [{"image": handle_file(images["noise"])}, {"image": handle_file(images["blur"])}], handle_file(images["ref"]),
        api_name="/rank")
    rows = table["data"]
    assert [row[2] for row in rows] == sorted(expected.values(), reverse=True)  # AHIQ, best first
    assert {row[1]: row[2] for row in rows} == expected
    psnr = {row[1]: float(row[table["headers"].index("PSNR (dB)")]) for row in rows}
    ref = cv2.imread(images["ref"]).astype(np.float64)
    for name in ("noise", "blur"):  # against the formula, by hand
        mse = np.mean((cv2.imread(images[name]).astype(np.float64) - ref) ** 2)
        assert psnr[f"{name}.png"] == pytest.approx(10 * np.log10(255 ** 2 / mse), abs=0.005)
    assert "MS-SSIM not computed: it needs images of at least 161x161 pixels" in summary
    assert len(panels) == 2
    for item in panels:  # each a panel: the image, the score, weight and weighted-score maps
        picture = cv2.imread(item["image"])
        assert picture.shape[1] > 3.5 * picture.shape[0] * 0.8 and picture.std() > 10


@pytest.mark.slow
def test_only_the_uploads_are_served_and_nothing_is_sent_elsewhere(server, tiny_checkpoint):
    url, recorder, _ = server
    for path in (tiny_checkpoint, Path("/etc/passwd"), ROOT / "README.md"):
        with pytest.raises(urllib.error.HTTPError) as refused:
            urllib.request.urlopen(f"{url}/gradio_api/file={path}", timeout=30)
        assert refused.value.code == 403, path
    assert recorder.requests == []


def _browser():
    """Headless Chromium from the system's packages under Selenium; skips, saying why, where there is none."""
    pytest.importorskip("selenium", reason="selenium is not installed (pip install selenium; .ci/run installs it)")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    binary = shutil.which("chromium") or shutil.which("chromium-browser")
    driver = shutil.which("chromedriver")
    if not binary or not driver:
        pytest.skip("no chromium and chromedriver here (Debian: apt-get install chromium chromium-driver; .ci/run "
                    "installs them)")
    options = webdriver.ChromeOptions()
    options.binary_location = binary
    for argument in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1280,1500"):
        options.add_argument(argument)
    options.set_capability("goog:loggingPrefs", {"performance": "ALL"})
    return webdriver.Chrome(service=Service(driver), options=options)


@pytest.mark.slow
def test_the_page_in_chromium(server, images, expected):
    """The page loads; a reference and two distorted images uploaded and scored show the command line's scores
    and drawn maps; a bad upload shows its message and the next good one still scores; the page asks nothing of
    any other host."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    url = server[0]
    browser = _browser()
    wait = WebDriverWait(browser, 120)

    def find(selector):
        return browser.find_element(By.CSS_SELECTOR, selector)

    def ranking():  # the table's cells, row by row (Gradio's dataframe draws them as grid cells)
        return browser.execute_script(
            "const rows = {}; document.querySelectorAll('#ranking [role=gridcell][data-row]').forEach(c => "
            "{ (rows[c.dataset.row] ||= [])[+c.dataset.col] = c.innerText.trim(); }); return Object.values(rows);")

    try:
        browser.get(url)
        wait.until(lambda b: b.find_elements(By.CSS_SELECTOR, "#reference input[type=file]"))
        assert browser.title == "AHIQ"
        find("#reference input[type=file]").send_keys(images["ref"])
        find("#distorted input[type=file]").send_keys(f"{images['noise']}\n{images['blur']}")
        wait.until(lambda b: len(b.find_elements(By.CSS_SELECTOR, "#distorted img")) == 2)
        find("#score").click()
        wait.until(lambda b: len(ranking()) == 2)
        assert {row[1]: row[2] for row in ranking()} == expected
        sources = [img.get_attribute("src") for img in browser.find_elements(By.CSS_SELECTOR, "#maps img")]
        assert len(sources) == 2
        for source in sources:  # the maps are drawn: a panel, not a blank picture
            picture = cv2.imdecode(np.frombuffer(urllib.request.urlopen(source, timeout=30).read(), np.uint8),
                                   cv2.IMREAD_COLOR)
            assert picture.std() > 10 and picture.shape[1] > 3 * picture.shape[0]
        if os.environ.get("AHIQ_SCREENSHOT"):  # the whole page, its results included
            browser.set_window_size(1280, browser.execute_script("return document.body.scrollHeight") + 120)
            time.sleep(1)
            browser.save_screenshot(os.environ["AHIQ_SCREENSHOT"])
        # a bad upload: its one line on the page; then, on the page loaded again, a good one scores
        find("#reference button[aria-label='Remove Image']").click()
        find("#reference input[type=file]").send_keys(images["text"])
        find("#score").click()
        wait.until(lambda b: any("notes.png is not an image this page can read (PNG, JPEG, BMP, TIFF or WebP)" in
                                 toast.text for toast in b.find_elements(By.CSS_SELECTOR, ".toast-body")))
        browser.get(url)
        wait.until(lambda b: b.find_elements(By.CSS_SELECTOR, "#reference input[type=file]"))
        find("#reference input[type=file]").send_keys(images["ref"])
        find("#distorted input[type=file]").send_keys(images["blur"])
        wait.until(lambda b: len(b.find_elements(By.CSS_SELECTOR, "#distorted img")) == 1)
        find("#score").click()
        wait.until(lambda b: len(ranking()) == 1)
        assert ranking()[0][1:3] == ["blur.png", expected["blur.png"]]
        requested = {json.loads(entry["message"])["message"]["params"].get("request", {}).get("url", "")
                     for entry in browser.get_log("performance")}
        elsewhere = {u for u in requested if u and not u.startswith((url, "data:", "blob:"))}
        assert not elsewhere, elsewhere
    finally:
        browser.quit()


class SlowScorer:
    """A scorer that takes ``seconds`` per request and has no maps: enough to fill the page's queue."""

    def __init__(self, seconds: float):
        self.seconds = seconds

    def check(self, pairs):
        pass

    def check_maps(self):
        raise ValueError("no maps here")

    def score_pairs(self, pairs, on_maps=None):
        time.sleep(self.seconds)
        return np.full(len(pairs), 0.5)


@pytest.mark.slow
def test_users_at_once_are_scored_one_at_a_time_and_a_full_queue_is_refused(images):
    """QUEUE requests wait while one is scored; the ones beyond are refused at once (memory stays bounded)."""
    pytest.importorskip("gradio", reason="the app extra (pip install -e '.[app]') is not installed")
    from gradio_client import Client, handle_file

    from ahiq.app import QUEUE, Page, build_page

    port, seconds = _free_port(), 2.0
    blocks = build_page(Page(SlowScorer(seconds), {}), [])
    blocks.launch(server_name="127.0.0.1", server_port=port, prevent_thread_lock=True, quiet=True)
    try:
        outcomes, started = [], time.monotonic()

        def ask():
            try:
                outcomes.append(Client(f"http://127.0.0.1:{port}/", verbose=False).predict(
                    handle_file(images["noise"]), handle_file(images["ref"]), api_name="/score"))
            except Exception as exc:  # the queue's refusal
                outcomes.append(str(exc))
        threads = [threading.Thread(target=ask) for _ in range(QUEUE + 4)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=300)
        scored = [o for o in outcomes if o == 0.5]
        refused = [o for o in outcomes if o != 0.5]
        assert len(outcomes) == QUEUE + 4 and QUEUE <= len(scored) <= QUEUE + 1, outcomes
        assert refused and all("queue is full" in o.lower() for o in refused), refused
        assert time.monotonic() - started >= len(scored) * seconds  # one after another, not side by side
    finally:
        blocks.close()
