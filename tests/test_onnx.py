"""AHIQ without PyTorch: ``python -m ahiq export`` writes ONNX graphs, and ``python -m ahiq score --onnx`` scores
with onnxruntime (numpy, OpenCV, no torch) as the PyTorch scorer does: the same scores (1e-5) on the same
crops in every crop mode, the same CSV and resume, the same errors for images and pairs; a damaged, partial or
foreign export folder is one line naming the file. Needs the ``onnx`` extra (skipped without it)."""
import csv
import json
import subprocess
import sys

import numpy as np
import pytest
import torch

pytest.importorskip("onnxruntime", reason="the ONNX tests need pip install -e '.[onnx]'")
pytest.importorskip("onnxscript", reason="the ONNX tests need pip install -e '.[onnx]'")

from ahiq import AHIQ, Scorer  # noqa: E402
from ahiq.cli import main  # noqa: E402
from ahiq.data.pairs import pair_files  # noqa: E402
from ahiq.registry.settings import EVAL_CROPS  # noqa: E402
from ahiq.scoring.protocol import PairScorer  # noqa: E402
from ahiq.scoring.onnx_scorer import SETTINGS, OnnxScorer  # noqa: E402
from conftest import ROOT, TINY  # noqa: E402
from trees import noisy_pairs  # noqa: E402

NO_BACKBONE_DOWNLOAD = ["--vit-pretrained", "false", "--cnn-pretrained", "false"]
# The packages the torch-free install leaves out, made unimportable where the ONNX scorer runs.
WITHOUT = ("torch", "torchvision", "timm", "scipy", "safetensors", "huggingface_hub", "tensorboard")
BLOCKED = f"import sys; sys.modules.update(dict.fromkeys({WITHOUT!r})); "


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """Checkpoints holding their backbones (AHIQ patch 8; an ensemble of AHIQ patch 16 and the ViT-only,
    spatially pooled variant), exported; pairs of two references in two sizes, three distorted images each."""
    folder = tmp_path_factory.mktemp("onnx")
    checkpoints = {}
    for name, patch, variant in (("p8", 8, {}), ("p16", 16, {}), ("vit_spatial", 8, {"fusion": "vit", "pooling": "spatial"})):
        torch.manual_seed(len(checkpoints))
        model = AHIQ(patch, False, False, **TINY, **variant, freeze_backbones=False)
        last = model.head.score if hasattr(model.head, "score") else model.head.regress[2]
        torch.nn.init.normal_(last.weight, std=30.0 / last.weight[0].numel() ** 0.5)  # scores spread as a trained model's
        model.save_checkpoint(folder / f"{name}.pth")
        checkpoints[name] = folder / f"{name}.pth"
    exports = {"p8": [checkpoints["p8"]], "ensemble": [checkpoints["p16"], checkpoints["vit_spatial"]]}
    for name, paths in exports.items():
        assert main(["export", "--checkpoint", *map(str, paths), *NO_BACKBONE_DOWNLOAD, "--out",
                     str(folder / name)]) == 0
    noisy_pairs(folder / "images", 1, 3, "refs", "a")
    noisy_pairs(folder / "images", 1, 3, "refs", "b")
    import cv2

    for path in (folder / "images").rglob("b*.png"):  # the second reference's pairs 80 x 96: other windows
        cv2.imwrite(str(path), cv2.resize(cv2.imread(str(path)), (96, 80)))
    noisy_pairs(folder / "images", 2, 2, "refs", "w")
    for path in (folder / "images").rglob("w*.png"):  # whole-image evaluation takes crop-sized images
        cv2.imwrite(str(path), cv2.resize(cv2.imread(str(path)), (64, 64)))
    for name, rows in (("pairs.csv", [(p, 0, d) for p in ("b", "a") for d in range(3)]),
                       ("whole.csv", [("w", r, d) for r in range(2) for d in range(2)])):
        with open(folder / name, "w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(["dist", "ref"])
            writer.writerows([f"images/dist/{p}{r}_{d}.png", f"images/refs/{p}{r}.png"] for p, r, d in rows)
    return folder, exports


@pytest.mark.parametrize("crops", EVAL_CROPS)
@pytest.mark.parametrize("export", ["p8", "ensemble"])
def test_onnxruntime_gives_the_pytorch_scores_on_the_same_crops(exported, export, crops):
    folder, exports = exported
    from ahiq.data.pairs import pairs_from_csv

    pairs = pairs_from_csv(folder / "pairs.csv" if crops != "whole" else folder / "whole.csv")
    settings = dict(crops=crops, num_crops=7, seed=3)
    torch_scorer = Scorer(exports[export], vit_pretrained=False, cnn_pretrained=False, **settings)
    onnx_scorer = OnnxScorer(folder / export, **settings)
    assert isinstance(onnx_scorer, PairScorer)
    expected, got = torch_scorer.score_pairs(pairs), onnx_scorer.score_pairs(pairs)
    assert expected.std() > 1e-3  # the pairs score differently: agreement means something
    np.testing.assert_allclose(got, expected, rtol=0, atol=1e-5)


def test_the_settings_file_describes_the_export(exported):
    folder, exports = exported
    settings = json.loads((folder / "ensemble" / SETTINGS).read_text())
    assert (settings["format"], settings["version"], settings["crop_size"]) == ("ahiq-onnx", 1, 64)
    assert settings["crops"]["mode"] == "random" and settings["crops"]["count"] == 20 and settings["crops"]["seed"] == 0
    assert "(x - 0.5) / 0.5" in settings["input"]
    models = settings["models"]
    assert [m["config"]["patch_size"] for m in models] == [16, 8] and models[1]["config"]["fusion"] == "vit"
    from ahiq.nn.downloads import sha256_of

    assert [m["sha256"] for m in models] == [sha256_of(p) for p in exports["ensemble"]]
    assert models[0]["score"]["inputs"] == ["dist", "reduced", "offset"] and models[1]["score"]["inputs"] == ["dist", "reduced"]
    for name, entry in settings["files"].items():
        assert (folder / "ensemble" / name).stat().st_size == entry["size"]
    assert settings["verified"]["max_abs_diff_from_pytorch"] < 1e-5


def test_scoring_without_torch_writes_the_pytorch_csv_and_resumes(exported, tmp_path):
    """torch made unimportable in the scoring process; the CSV equals the PyTorch scorer's to 1e-5; a run
    stopped after its first reference continues with --resume to the same file."""
    folder, exports = exported
    command = ["score", "--onnx", str(folder / "p8"), "--pairs", str(folder / "pairs.csv"), "--out"]
    script = BLOCKED + "from ahiq.cli import main; sys.exit(main(sys.argv[1:]))"
    done = subprocess.run([sys.executable, "-c", script, *command, str(tmp_path / "onnx.csv")], cwd=ROOT,
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert "onnxruntime" in done.stderr and "torch" not in done.stderr.replace("onnxruntime", "")
    assert main(["score", "--checkpoint", str(exports["p8"][0]), *NO_BACKBONE_DOWNLOAD, "--pairs",
                 str(folder / "pairs.csv"), "--out", str(tmp_path / "torch.csv")]) == 0
    read = lambda path: list(csv.DictReader(open(path)))  # noqa: E731
    onnx_rows, torch_rows = read(tmp_path / "onnx.csv"), read(tmp_path / "torch.csv")
    assert [(r["dist"], r["ref"]) for r in onnx_rows] == [(r["dist"], r["ref"]) for r in torch_rows]
    np.testing.assert_allclose([float(r["score"]) for r in onnx_rows], [float(r["score"]) for r in torch_rows],
                               atol=2e-6)  # the CSV's six decimals
    # stopped after the first reference (as a SIGTERM stops it), then resumed
    import ahiq.scoring.onnx_scorer as onnx_module
    from ahiq.runtime.signals import Stopped

    real = onnx_module.OnnxScorer.score_pairs

    def stops(self, pairs, progress=False, on_reference=None, on_maps=None):
        def once(indices, scores):
            on_reference(indices, scores)
            raise Stopped("stopped", 15)
        return real(self, pairs, progress, once, on_maps)

    onnx_module.OnnxScorer.score_pairs = stops
    try:
        assert main(command + [str(tmp_path / "resumed.csv")]) == 143
    finally:
        onnx_module.OnnxScorer.score_pairs = real
    assert not (tmp_path / "resumed.csv").exists() and (tmp_path / "resumed.csv.part0").is_file()
    assert main(command + [str(tmp_path / "resumed.csv"), "--resume"]) == 0
    assert (tmp_path / "resumed.csv").read_text() == (tmp_path / "onnx.csv").read_text()
    # a journal of ONNX scores is not continued by PyTorch (other settings, other numbers)
    assert main(command + [str(tmp_path / "mixed.csv")]) == 0


def test_the_onnx_modules_load_no_torch():
    code = BLOCKED + "import ahiq.scoring.onnx_scorer, ahiq.scoring.output, ahiq.cli; print('ok')"
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
    assert done.stdout.strip() == "ok", done.stderr


def test_the_documented_torch_free_install_is_the_scripts():
    sys.path.insert(0, str(ROOT / "scripts"))
    from torch_free_install import TORCH_FREE

    command = "pip install --no-deps . && pip install " + " ".join(
        f'"{p}"' if ">" in p else p for p in TORCH_FREE)
    assert command in (ROOT / "docs" / "scoring.md").read_text()
    assert command in (ROOT / "README.md").read_text()


def test_a_damaged_partial_or_foreign_export_is_one_line_naming_the_file(exported, tmp_path, capsys):
    import shutil

    folder, _ = exported
    d, r = folder / "images" / "dist" / "a0_0.png", folder / "images" / "refs" / "a0.png"

    def error(export):
        code = main(["score", "--onnx", str(export), "--dist", str(d), "--ref", str(r)])
        err = capsys.readouterr().err.strip()
        assert code == 2 and len(err.splitlines()) == 1, err
        return err

    copy = tmp_path / "copy"
    shutil.copytree(folder / "p8", copy)
    data = copy / "model0_score.onnx.data"
    data.write_bytes(data.read_bytes()[:-1] + bytes([data.read_bytes()[-1] ^ 1]))  # one bit
    assert f"{data} is damaged" in error(copy)
    data.unlink()
    assert f"{data} is missing (the export is incomplete)" in error(copy)
    settings = json.loads((folder / "p8" / SETTINGS).read_text())
    (copy / SETTINGS).write_text(json.dumps({**settings, "version": 2}))
    assert f"{copy / SETTINGS} is ahiq-onnx version 2; this ahiq reads version 1" in error(copy)
    (copy / SETTINGS).write_text("{not json")
    assert f"{copy / SETTINGS} cannot be read (JSONDecodeError" in error(copy)
    (copy / SETTINGS).unlink()
    assert f"{copy} holds no {SETTINGS}" in error(copy)
    assert "is not a folder" in error(tmp_path / "nowhere")


def _edited(settings: dict, edit) -> dict:
    copied = json.loads(json.dumps(settings))
    edit(copied)
    return copied


# A hand-edited ahiq_onnx.json: (what is done to it, the field the one line must name and what it needs).
EDITS = [
    (lambda s: s.pop("crop_size"), "field 'crop_size' must be a whole number of at least 1, got nothing"),
    (lambda s: s.update(crop_size="64"), "field 'crop_size' must be a whole number of at least 1, got \"64\""),
    (lambda s: s.update(version="1"), "field 'version' must be the whole number 1, got \"1\""),
    (lambda s: s.update(models=[]), "field 'models' must be a list of one or more models, got []"),
    (lambda s: s["crops"].update(count="20"), "field 'crops.count' must be a whole number of at least 1"),
    (lambda s: s["crops"].update(mode="all"), "field 'crops.mode' must be one of five, nine, random, centre, whole"),
    (lambda s: s["crops"].update(seed=-1), "field 'crops.seed' must be a whole number of at least 0, got -1"),
    (lambda s: s.update(files={}), "field 'files' must be an object naming each graph file, got {}"),
    (lambda s: s.update(files={f"../{k}": v for k, v in s["files"].items()}), "field 'files' must be plain file names"),
    (lambda s: s["models"][0]["score"].pop("file"), "field 'models[0].score.file' must be one of the files listed"),
    (lambda s: s["models"][0]["config"].update(img_size=32), "field 'models[0].config.img_size' must be the crop_size"),
    (lambda s: s["models"][0]["config"].update(fusion=None), "field 'models[0].config.fusion' must be one of"),
    (lambda s: s.clear(), "field 'format' must be \"ahiq-onnx\""),
]


@pytest.mark.parametrize("edit, named", EDITS, ids=[named.split("'")[1] + f"-{i}" for i, (_, named) in enumerate(EDITS)])
def test_a_hand_edited_settings_file_is_one_line_naming_the_field(exported, tmp_path, capsys, edit, named):
    """Never a traceback, never a NaN score with exit status 0 (an emptied model list averaged nothing)."""
    import shutil

    folder, _ = exported
    shutil.copytree(folder / "p8", tmp_path / "copy")
    settings = json.loads((folder / "p8" / SETTINGS).read_text())
    (tmp_path / "copy" / SETTINGS).write_text(json.dumps(_edited(settings, edit)))
    code = main(["score", "--onnx", str(tmp_path / "copy"), "--dist", str(folder / "images" / "dist" / "a0_0.png"),
                 "--ref", str(folder / "images" / "refs" / "a0.png")])
    captured = capsys.readouterr()
    assert code == 2 and captured.out == "" and len(captured.err.strip().splitlines()) == 1, captured
    assert named in captured.err and f"{tmp_path / 'copy' / SETTINGS}" in captured.err


def test_onnx_refuses_what_it_cannot_do_and_reports_bad_pairs_as_pytorch_does(exported, tmp_path, capsys):
    folder, exports = exported
    d, r = folder / "images" / "dist" / "a0_0.png", folder / "images" / "refs" / "b0.png"  # 72 x 72 against 80 x 96
    base = ["score", "--dist", str(d), "--ref", str(r)]
    errors = []
    for source in (["--onnx", str(folder / "p8")], ["--checkpoint", str(exports["p8"][0]), *NO_BACKBONE_DOWNLOAD]):
        assert main([*base, *source]) == 2
        errors.append(capsys.readouterr().err.strip())
    assert errors[0] == errors[1] and "a0_0.png is 72x72 but its reference" in errors[0]
    with pytest.raises(SystemExit):
        main([*base, "--onnx", str(folder / "p8"), "--precision", "bf16", "--checkpoint", "pipal"])
    assert "--onnx scores with the export's own models on onnxruntime: leave out --checkpoint, --precision" in \
        capsys.readouterr().err
    good = ["score", "--dist", str(d), "--ref", str(folder / "images" / "refs" / "a0.png"), "--onnx", str(folder / "p8")]
    assert main([*good, "--maps", str(tmp_path / "maps")]) == 2
    assert "--maps needs the PyTorch scorer" in capsys.readouterr().err


def test_export_refuses_random_backbones_and_an_occupied_folder(exported, tmp_path, capsys):
    folder, exports = exported
    head_only = tmp_path / "head_only.pth"
    AHIQ(8, False, False, **TINY).save_checkpoint(head_only)
    assert main(["export", "--checkpoint", str(head_only), *NO_BACKBONE_DOWNLOAD, "--out", str(tmp_path / "e")]) == 2
    assert "the scores would come from random backbone weights" in capsys.readouterr().err
    (tmp_path / "occupied").mkdir()
    (tmp_path / "occupied" / "notes.txt").write_text("mine")
    assert main(["export", "--checkpoint", str(exports["p8"][0]), *NO_BACKBONE_DOWNLOAD, "--out",
                 str(tmp_path / "occupied")]) == 2
    assert "holds other files than an AHIQ export" in capsys.readouterr().err
    assert (tmp_path / "occupied" / "notes.txt").read_text() == "mine" and not (tmp_path / "e").exists()


@pytest.mark.slow
def test_a_full_size_vit_b8_exports_and_scores_as_pytorch(tmp_path):
    """The paper's network (random weights, generated backbone files): the exported graphs score a
    240 x 224 pair's centre crop as PyTorch does."""
    from ahiq.nn.official import random_official_setup

    torch.manual_seed(0)
    _, model, checkpoint = random_official_setup(8, tmp_path / "weights")
    noisy_pairs(tmp_path / "images", 1, 1, "refs", "r")
    import cv2

    for path in (tmp_path / "images").rglob("*.png"):
        cv2.imwrite(str(path), cv2.resize(cv2.imread(str(path)), (240, 224)))
    pretrained = ["--vit-pretrained", str(tmp_path / "weights" / "vit.pth"), "--cnn-pretrained",
                  str(tmp_path / "weights" / "resnet.pth")]
    assert main(["export", "--checkpoint", str(checkpoint), *pretrained, "--crops", "centre", "--out",
                 str(tmp_path / "export")]) == 0
    pairs = pair_files(tmp_path / "images" / "dist" / "r0_0.png", tmp_path / "images" / "refs" / "r0.png")
    onnx = OnnxScorer(tmp_path / "export").score_pairs(pairs)
    scorer = Scorer(checkpoint, vit_pretrained=tmp_path / "weights" / "vit.pth",
                    cnn_pretrained=tmp_path / "weights" / "resnet.pth", crops="centre")
    np.testing.assert_allclose(onnx, scorer.score_pairs(pairs), rtol=0, atol=1e-5)


def test_export_faults_leave_the_earlier_export_whole_and_say_so_in_one_line(exported, tmp_path, capsys, monkeypatch):
    """A full disk, Ctrl-C and a second export into the same folder, while --out holds an earlier export; and
    the exporter's packages missing, found before any model is loaded."""
    import errno
    import shutil

    from ahiq.files import take_lock
    from ahiq.scoring import export

    folder, exports = exported
    out = tmp_path / "out"
    shutil.copytree(folder / "p8", out)
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    command = ["export", "--checkpoint", str(exports["p8"][0]), *NO_BACKBONE_DOWNLOAD, "--out", str(out)]

    def fails(error):
        def export_model(*args, **kwargs):
            raise error
        return export_model

    for error, code, said in ((OSError(errno.ENOSPC, "No space left on device"), 2, "No space left on device"),
                              (KeyboardInterrupt(), 130, "interrupted: no export was written")):
        monkeypatch.setattr(export, "_export_model", fails(error))
        assert main(command) == code
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and said in err and "Traceback" not in err, err
        assert {p.name: p.read_bytes() for p in out.iterdir()} == before  # the earlier export, byte for byte
        assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # nothing half-written left beside it
    held = take_lock(tmp_path / ".out.export.lock", "a test's export", "")
    try:
        assert main(command) == 2
        assert "is in use by process" in capsys.readouterr().err
    finally:
        held.close()
    monkeypatch.setattr("importlib.util.find_spec", lambda name, *a: None if name == "onnxscript" else object())
    monkeypatch.setattr(AHIQ, "from_pretrained", fails(AssertionError("a model was loaded before the check")))
    assert main(command) == 2
    assert "needs onnxscript; install them with pip install onnx onnxscript 'onnxruntime>=1.25'" in \
        capsys.readouterr().err
