import math
import zipfile

import pytest

from ahiq.engine.results import write_ntire_submission
from trees import META


def _lines(text):
    return [line for line in text.splitlines() if line.strip()]


def test_submission_zip_has_the_real_structure(tmp_path):
    scores = {"A0001_10_02.bmp": 1400.5, "A0000_10_00.bmp": 0.25, "A0000_10_01.bmp": -3.0}
    path = write_ntire_submission(scores, tmp_path, runtime=0.1234, gpu=True, extra_data=False,
                                  description="AHIQ\nensemble of two")
    with zipfile.ZipFile(path) as zf:
        assert sorted(zf.namelist()) == ["output.txt", "readme.txt"]
        output = zf.read("output.txt").decode()
        readme = zf.read("readme.txt").decode()
    assert _lines(output) == ["A0000_10_00.bmp,0.250000", "A0000_10_01.bmp,-3.000000", "A0001_10_02.bmp,1400.500000"]
    assert _lines(readme) == ["runtime per image [s] : 0.1234", "CPU[1] / GPU[0] : 0",
                              "Extra Data [1] / No Extra Data [0] : 0", "Other description : AHIQ ensemble of two",
                              "Full-Reference [1] / Non-Reference [0] : 1"]
    assert (tmp_path / "output.txt").read_text() == output


def test_submission_matches_the_real_ntire2022_example(tmp_path):
    example = META / "ntire2022_submission_example"
    if not example.is_dir():
        pytest.skip("real submission example not available")
    real_names = [line.split(",")[0] for line in _lines((example / "output.txt").read_text())]
    path = write_ntire_submission({n: float(i) for i, n in enumerate(real_names)}, tmp_path, 0.5, False, True, "x")
    with zipfile.ZipFile(example / "submission.zip") as real, zipfile.ZipFile(path) as ours:
        real_files = sorted(n for n in real.namelist() if not n.startswith("__MACOSX"))
        assert sorted(ours.namelist()) == real_files
        assert [l.split(",")[0] for l in _lines(ours.read("output.txt").decode())] == sorted(real_names)
        real_keys = [l.split(" : ")[0] for l in _lines(real.read("readme.txt").decode())]
        assert [l.split(" : ")[0] for l in _lines(ours.read("readme.txt").decode())] == real_keys


def test_submission_rejects_bad_scores(tmp_path):
    with pytest.raises(ValueError, match="non-finite scores"):
        write_ntire_submission({"a.bmp": math.nan}, tmp_path, 0.1, True, False, "")
    with pytest.raises(ValueError, match="no scores"):
        write_ntire_submission({}, tmp_path, 0.1, True, False, "")
