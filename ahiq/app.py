"""``python -m ahiq app``: a web page (Gradio, the optional extra ``pip install -e '.[app]'``) where a reference and
distorted versions of it are scored as ``python -m ahiq score`` scores them (the same Scorer, crops and seed), the
distorted images ranked beside PSNR, SSIM and the other baselines piq computes, with each image's quality maps.
The scoring is also the API endpoint ``/score`` (distorted image, reference image -> score) for Gradio clients.

What a server needs: it listens on 127.0.0.1 unless told otherwise; it reads only the files uploaded to it (and
the examples it generates); Gradio's analytics are off and the page loads nothing from elsewhere (system fonts),
so it works with no network; one request is scored at a time and at most QUEUE wait, each with at most
MAX_DISTORTED images of at most MAX_PIXELS pixels and MAX_FILE bytes, so its memory is bounded; a bad upload
is answered on the page in one line and the server goes on serving."""
from __future__ import annotations

import math
import os
import shutil
import signal
import socket
import sys
import tempfile
import threading
import traceback
from contextlib import contextmanager
from pathlib import Path

import cv2
import numpy as np

from ahiq.data.images import image_size, read_image
from ahiq.data.pairs import Pair, Pairs
from ahiq.data.synthetic import distort, reference_image
from ahiq.messages import for_the_user
from ahiq.registry.baselines import BASELINES
from ahiq.runtime.signals import SIGNALS, Stopped
from ahiq.scoring.maps import panel, score_range

os.environ["GRADIO_ANALYTICS_ENABLED"] = "False"  # read when gradio is imported: no telemetry, no version check

MAX_PIXELS = 12_000_000   # per image: a 12-megapixel photograph (4000 x 3000)
MAX_DISTORTED = 8         # distorted images per request
MAX_FILE = "30mb"         # per uploaded file
QUEUE = 8                 # requests waiting while one is scored
SHOWN_SIDE = 640          # the longer side of an image in the page's panels: the maps are sent at that size
MEANING = ("Higher is better. AHIQ predicts the opinion score of the images its model was trained on, min-max "
           "normalised: about 0 for the worst of them, 1 for the best (the released model: PIPAL's). Compare versions "
           "of one reference; a score is not a percentage.")
# The panels are wide: shown whole, one under another, not in the gallery's square tiles.
PANELS_CSS = ("#maps .grid-wrap { height: auto !important; max-height: none !important; } "
              "#maps .grid-container { padding-top: 2em; } "
              "#maps .thumbnail-item { aspect-ratio: auto !important; height: auto !important; } "
              "#maps .thumbnail-item img { height: auto !important; }")
EXAMPLE_LEVELS = (("noise", 2), ("blur", 2), ("jpeg", 3))  # the demo set's distortions (ahiq.data.synthetic)


class PageError(ValueError):
    """A request the page cannot score: the message is what the page shows."""


def upload_name(payload: dict) -> str:
    """An upload's own file name (Gradio keeps it as ``orig_name``; the file it stores is renamed), never a path."""
    name = Path(str(payload.get("orig_name") or Path(payload["path"]).name).replace("\\", "/")).name
    return name if name not in ("", ".", "..") else "image"


def check_upload(path: Path, name: str) -> None:
    """An uploaded file is an image of at most MAX_PIXELS, judged from its header (PIL reads no pixels for it)
    before anything decodes it."""
    from PIL import Image  # Gradio's dependency

    try:
        with Image.open(path) as image:
            width, height = image.size
    except Image.DecompressionBombError:
        width = height = math.inf
    except Exception:
        raise PageError(f"{name} is not an image this page can read (PNG, JPEG, BMP, TIFF or WebP)") from None
    if width * height > MAX_PIXELS:
        size = "too many pixels" if math.isinf(width) else f"{width}x{height} = {width * height / 1e6:.1f} megapixels"
        raise PageError(f"{name} has {size}: this page takes images of at most {MAX_PIXELS / 1e6:g} megapixels "
                        f"(python -m ahiq score takes any size)")


class Uploads:
    """A request's uploads as Pairs: each file copied under its own name into a folder of the request (its name
    seeds the random crops, as the file's name does on the command line). ``said`` words an error as the page
    shows it: one line, naming the uploads, not their copies."""

    def __init__(self, folder: Path):
        self.folder, self.names, self.pairs = folder, {}, Pairs()

    def copy(self, payload: dict, subfolder: str) -> Path:
        """An upload (Gradio's file payload: a path in its cache, the original name) copied into ``subfolder``,
        checked to be an image within the limits."""
        name = upload_name(payload)
        target = self.folder / subfolder / name
        target.parent.mkdir()
        shutil.copyfile(payload["path"], target)
        self.names[str(target)] = name
        check_upload(target, name)
        return target

    def said(self, exc: BaseException) -> str:
        lines = [line.strip() for line in for_the_user(exc).splitlines() if line.strip()] or [type(exc).__name__]
        message = lines[0]
        for line in lines[1:]:  # a list of problems after its heading's colon, one after another
            message += (" " if message.endswith(":") else "; ") + line
        for path in sorted(self.names, key=len, reverse=True):
            message = message.replace(path, self.names[path])
        return message


class Page:
    """The page's two functions over one loaded scorer: ``rank`` (the page) and ``score`` (the /score endpoint).
    ``baselines``: name -> a BaselineScorer, run on the same pairs."""

    def __init__(self, scorer, baselines: dict):
        self.scorer, self.baselines = scorer, baselines
        self.maps_missing = _no_maps(scorer)

    @contextmanager
    def _uploads(self, distorted: list[dict], reference: dict | None):
        """The request's Uploads, checked as ``python -m ahiq score`` checks its pairs; every failure while they
        are used a PageError worded by Uploads.said."""
        if reference is None or not distorted:
            raise PageError("upload a reference image and at least one distorted version of it")
        if len(distorted) > MAX_DISTORTED:
            raise PageError(f"{len(distorted)} distorted images: this page scores at most {MAX_DISTORTED} at once")
        with tempfile.TemporaryDirectory(prefix="ahiq-page-") as folder:
            uploads = Uploads(Path(folder))
            try:
                ref = uploads.copy(reference, "reference")
                dists = [uploads.copy(d, f"distorted {n}") for n, d in enumerate(distorted, 1)]
                uploads.pairs = Pairs([Pair(str(ref), str(d), math.nan, d.name) for d in dists])
                self.scorer.check(uploads.pairs)
                yield uploads
            except PageError:
                raise
            except (ValueError, OSError) as exc:  # the data layer's one-line errors (ImageError, DatasetError)
                raise PageError(uploads.said(exc)) from None

    def score(self, distorted: dict | None, reference: dict | None) -> float:
        """/score: one pair's AHIQ score, as ``python -m ahiq score`` gives it."""
        with _answered(), self._uploads([distorted] if distorted else [], reference) as uploads:
            return float(self.scorer.score_pairs(uploads.pairs)[0])

    def rank(self, distorted: list[dict] | None, reference: dict | None, progress=None):
        """The page: (a summary, the ranking table, one panel per distorted image with its maps), best first."""
        with _answered(), self._uploads([item["image"] for item in distorted or []], reference) as uploads:
            pairs, found = uploads.pairs, {}
            count, steps = len(pairs), len(pairs) + len(self.baselines)  # the progress: images, then baselines

            def step(done: int, what: str) -> None:
                if progress is not None:
                    progress(done / steps, desc=what)

            def on_maps(indices, maps):
                found.update(zip(indices, maps))
                step(len(found), f"AHIQ: {len(found)} of {count} images scored")
            step(0, f"AHIQ: scoring {count} images")
            scores = self.scorer.score_pairs(pairs, on_maps=None if self.maps_missing else on_maps)
            columns, notes = {}, []
            side = min(image_size(pairs[0].ref))
            for number, (name, baseline) in enumerate(self.baselines.items()):
                step(count + number, BASELINES[name].label)
                if side < BASELINES[name].min_size:  # too small for this metric: its column stays empty
                    notes.append(f"{BASELINES[name].label} not computed: it needs images of at least "
                                 f"{BASELINES[name].min_size}x{BASELINES[name].min_size} pixels")
                else:
                    columns[name] = baseline.score_pairs(pairs)
            order = sorted(range(count), key=lambda i: -scores[i])
            table = [[rank, pairs[i].name, f"{scores[i]:.6f}",
                      *(_baseline_cell(name, columns[name][i]) if name in columns else "--" for name in self.baselines)]
                     for rank, i in enumerate(order, 1)]
            panels = self._panels(pairs, scores, order, found)
        notes.append(f"maps: {self.maps_missing}" if self.maps_missing else
                     "maps: the score map (the model's quality per patch), the weight map (how much each patch counts) "
                     "and their product (score x weight / mean weight: what each region adds to the score); one "
                     "colour scale for all images")
        summary = f"**{count} distorted image{'s' * (count > 1)} ranked by AHIQ.** {MEANING}\n\n" + "\n\n".join(notes)
        return summary, table, panels

    def headers(self) -> list[str]:
        return ["rank", "image", "AHIQ", *(f"{BASELINES[n].label}{' (dB)' * (n == 'psnr')}" for n in self.baselines)]

    def _panels(self, pairs: Pairs, scores: np.ndarray, order: list[int], found: dict) -> list:
        """Each distorted image, best first, as ``--maps`` draws it (maps.panel), at most SHOWN_SIDE pixels on a
        side; the image alone where the model has no maps."""
        image_maps = {i: found[i].image_maps()[:2] for i in found}
        scale = score_range([score_map for score_map, _ in image_maps.values()])
        shown = []
        for rank, i in enumerate(order, 1):
            image = _smaller(read_image(pairs[i].dist))
            title = f"{rank}. {pairs[i].name}: AHIQ {scores[i]:.6f}"
            if i in image_maps:
                size = (image.shape[1], image.shape[0])
                score_map, weight_map = (cv2.resize(m, size, interpolation=cv2.INTER_NEAREST) for m in image_maps[i])
                image = panel(image, score_map, weight_map, scale, title)[..., ::-1]
            # the panel carries its title; a caption over it would hide the colour scale's label
            shown.append((np.ascontiguousarray(image), None if i in image_maps else title))
        return shown


def _no_maps(scorer) -> str:
    """Why the scorer's pairs have no quality maps ('' when they have)."""
    try:
        scorer.check_maps()
    except ValueError as exc:
        return str(exc)
    return ""


def _smaller(image: np.ndarray) -> np.ndarray:
    longer = max(image.shape[:2])
    if longer <= SHOWN_SIDE:
        return image
    size = (round(image.shape[1] * SHOWN_SIDE / longer), round(image.shape[0] * SHOWN_SIDE / longer))
    return cv2.resize(image, size, interpolation=cv2.INTER_AREA)


def _baseline_cell(name: str, value: float) -> str:
    value = -value if BASELINES[name].lower_is_better else value  # the metric's own sign, as its papers print it
    return f"{value:.2f}" if name == "psnr" else f"{value:.4f}"


@contextmanager
def _answered():
    """Every failure of a request reaches the page (and a Gradio client) as Gradio's error with one readable
    line; an unexpected one is also printed in full on the server's standard error."""
    import gradio as gr

    try:
        yield
    except PageError as exc:
        raise gr.Error(str(exc), print_exception=False) from None
    except Exception as exc:
        traceback.print_exc(file=sys.stderr)
        raise gr.Error(f"{type(exc).__name__}: {for_the_user(exc).splitlines()[0]}", print_exception=False) from None


def make_examples(folder: Path, size: int) -> list[list]:
    """The page's example: a reference and three distorted versions drawn by the demo set's generator
    (ahiq.data.synthetic) at ``size`` pixels, written into ``folder``."""
    rng = np.random.default_rng(0)
    ref = reference_image(rng, size)
    files = []
    for kind, level in EXAMPLE_LEVELS:
        path = folder / f"example_{kind}_{level + 1}.png"
        cv2.imwrite(str(path), distort(ref, kind, level, rng)[..., ::-1])
        files.append(str(path))
    cv2.imwrite(str(folder / "example_reference.png"), ref[..., ::-1])
    return [[files, str(folder / "example_reference.png")]]


def available_baselines(names: list[str] | None, weights: str | None = None) -> list[str]:
    """The baselines the page shows: ``names`` (None: every one that can run here without a download), each
    refused in one line when it cannot: piq missing, or a learned metric's weights not found locally."""
    from ahiq.nn.zoo import find, weights_folder
    from ahiq.scoring.baselines import import_piq

    try:
        import_piq()
        has_piq = True
    except ImportError:
        has_piq = False
    folder = weights_folder(weights)
    chosen = []
    for name in names if names is not None else list(BASELINES):
        baseline = BASELINES.choice(name, "--baselines")
        missing = [f.name for f in baseline.weights if find(f, folder) is None]
        problem = ("needs piq: pip install piq" if not has_piq and baseline.module == "piq" else
                   f"needs {', '.join(missing)}, not found here: python -m ahiq download {name}" if missing else "")
        if not problem:
            chosen.append(name)
        elif names is not None:
            raise ValueError(f"--baselines {name} {problem}")
    return chosen


def build_page(page: Page, examples: list[list]):
    """The Gradio page of ``page``, queued: uploads, the button, the summary, the ranking, the panels, the example;
    its events ``/rank`` (the page's) and ``/score`` (one pair's score, for clients). Files reach the functions as
    Gradio's payloads (preprocess off): read by this package's reader as the command line reads them."""
    import gradio as gr

    def rank(distorted, reference, progress=gr.Progress()):
        return page.rank(distorted, reference, progress)

    with gr.Blocks(title="AHIQ", analytics_enabled=False, delete_cache=(3600, 3600)) as blocks:
        gr.Markdown("# AHIQ: where does the model see damage?\nUpload (or paste) a reference image and distorted "
                    "versions of it, then Score: each is scored by AHIQ (Lao, Gong et al., CVPRW 2022), ranked beside "
                    "the classic metrics, and drawn with its quality maps.")
        with gr.Row():
            reference = gr.Image(label="reference", type="filepath", image_mode=None, sources=["upload", "clipboard"],
                                 elem_id="reference")
            distorted = gr.Gallery(label=f"distorted versions (at most {MAX_DISTORTED})", type="filepath",
                                   interactive=True, file_types=["image"], sources=["upload", "clipboard"],
                                   columns=4, elem_id="distorted")
        gr.Examples(examples, inputs=[distorted, reference], label="an example from the demo set's generator")
        button = gr.Button("Score", variant="primary", elem_id="score")
        summary = gr.Markdown(label="summary", elem_id="summary")
        table = gr.Dataframe(headers=page.headers(), label="ranking", interactive=False, elem_id="ranking")
        panels = gr.Gallery(label="quality maps, best first", format="png", columns=1, object_fit="contain",
                            allow_preview=False, preview=False, elem_id="maps")
        button.click(rank, [distorted, reference], [summary, table, panels], api_name="rank", preprocess=False,
                     concurrency_id="ahiq")
        # /score: two hidden inputs and a hidden output make it an endpoint of its own for Gradio clients
        one_dist, one_ref = (gr.Image(type="filepath", image_mode=None, visible=False) for _ in range(2))
        gr.Button(visible=False).click(page.score, [one_dist, one_ref], gr.Number(visible=False), api_name="score",
                                       preprocess=False, concurrency_id="ahiq")
    return blocks.queue(default_concurrency_limit=1, max_size=QUEUE)  # one scored at a time, QUEUE waiting


def check_address(host: str, port: int) -> None:
    """Refuse, before any model loads, an address the page cannot listen on: a port in use (by another page) or
    reserved, a host that is not one of this machine's."""
    try:
        family, kind, protocol, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
        with socket.socket(family, kind, protocol) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as the server binds: a closed port is free
            probe.bind(address)
    except OSError as exc:
        raise ValueError(f"--host {host} --port {port}: the page cannot listen there ({exc.strerror or exc}); give "
                         f"another --port, or a --host of this machine") from None


@contextmanager
def stopped_by_signals():
    """SIGTERM (a service manager's stop) closes the server as Ctrl-C does (Gradio's launch closes it on a
    KeyboardInterrupt), so that what ``serve`` made is removed on the way out; either ends in ``Stopped`` (one
    line, 128 + the signal's number)."""
    received = []

    def stop(signum, frame):
        received.append(signum)
        raise KeyboardInterrupt

    main = threading.current_thread() is threading.main_thread()  # only there can Python handle signals
    previous = {s: signal.signal(s, stop) for s in SIGNALS} if main else {}
    try:
        yield
    except KeyboardInterrupt:
        if not received:  # not ours: a KeyboardInterrupt of another kind
            raise
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
    if received:
        raise Stopped(f"ahiq app: stopped on {signal.Signals(received[0]).name}; the server is closed", received[0])


def serve(host: str, port: int, device: str | None, baselines: list[str] | None, **scorer_settings) -> None:
    """Load the scorer (ahiq.Scorer of ``scorer_settings``, as the score command builds it) and the baselines,
    then serve the page at http://host:port until interrupted."""
    try:
        import gradio as gr
    except ImportError:
        raise ImportError("the web page needs the optional package gradio: pip install -e '.[app]'") from None
    from ahiq.scoring.baselines import BaselineScorer
    from ahiq.scoring.scorer import Scorer

    check_address(host, port)
    weights = scorer_settings.get("weights")
    names = available_baselines(baselines, weights)
    scorer = Scorer(device=device or "auto", **scorer_settings)
    page = Page(scorer, {name: BaselineScorer(name, scorer.ensemble.runtime.device, weights) for name in names})
    plan = scorer.ensemble.plan
    with tempfile.TemporaryDirectory(prefix="ahiq-examples-") as folder, stopped_by_signals():
        examples = make_examples(Path(folder), plan.size if plan.mode == "whole" else max(96, plan.size * 5 // 4))
        blocks = build_page(page, examples)
        print(f"ahiq app: {scorer.describe()}; baselines {', '.join(names) or 'none'}", file=sys.stderr, flush=True)
        system = ["ui-sans-serif", "system-ui", "sans-serif"]  # not Google's fonts: the page loads nothing else
        theme = gr.themes.Default(font=system, font_mono=["ui-monospace", "monospace"])
        try:  # a signal before Gradio waits for one ends launch with the KeyboardInterrupt: the server closed here
            blocks.launch(server_name=host, server_port=port, share=False, max_file_size=MAX_FILE,
                          allowed_paths=[folder], footer_links=["api"], theme=theme, css=PANELS_CSS)
        finally:
            blocks.close(verbose=False)
