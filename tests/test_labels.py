import math
from pathlib import Path

import numpy as np
import pytest
from scipy.io import savemat

from ahiq.data import DatasetError, read_labels
from trees import LIVE_FOLDERS, csiq_tree, kadid_tree, live_tree, meta, pipal_tree, tid_tree, touch


def triple(pair, root: Path):
    return (Path(pair.ref).relative_to(root).as_posix(), Path(pair.dist).relative_to(root).as_posix(), pair.mos)


# ---- the real label files (../shared/iqa-meta), names on disk in another letter case where the
# distributed data has them so ------------------------------------------------------------------------------

def test_real_tid2013(tmp_path):
    tid_tree(tmp_path, meta("tid2013/mos_with_names.txt"), 25)
    pairs = read_labels("tid2013", tmp_path)
    assert len(pairs) == 3000 and pairs.higher_is_better
    assert triple(pairs[0], tmp_path) == ("reference_images/I01.BMP", "distorted_images/i01_01_1.BMP", 5.51429)
    assert triple(pairs[-1], tmp_path) == ("reference_images/i25.bmp", "distorted_images/I25_24_5.BMP", 2.77143)
    assert len({p.ref for p in pairs}) == 25


def test_real_tid2008(tmp_path):
    tid_tree(tmp_path, meta("tid2008/mos_with_names.txt"), 25)
    pairs = read_labels("tid2008", tmp_path)
    assert len(pairs) == 1700 and len({p.ref for p in pairs}) == 25
    assert triple(pairs[0], tmp_path) == ("reference_images/I01.BMP", "distorted_images/i01_01_1.BMP", 5.9706)


def test_real_kadid10k(tmp_path):
    kadid_tree(tmp_path, meta("kadid10k/dmos.csv"))
    pairs = read_labels("kadid10k", tmp_path)
    assert len(pairs) == 10125 and pairs.higher_is_better and len({p.ref for p in pairs}) == 81
    assert triple(pairs[0], tmp_path) == ("images/I01.png", "images/I01_01_01.png", 4.57)


def test_real_live(tmp_path):
    live_tree(tmp_path, meta("live/dmos.mat"), meta("live/refnames_all.mat"))
    pairs = read_labels("live", tmp_path)
    assert len(pairs) == 779 and not pairs.higher_is_better and len({p.ref for p in pairs}) == 29
    per_folder = {f: sum(p.name.startswith(f + "/") for p in pairs) for f, _ in LIVE_FOLDERS}
    assert per_folder == {"jp2k": 169, "jpeg": 175, "wn": 145, "gblur": 145, "fastfading": 145}
    # Entry 0 (jp2k/img1.bmp) is a reference copy (orgs == 1); entry 1 is the first real pair.
    ref, dist, mos = triple(pairs[0], tmp_path)
    assert (ref, dist) == ("refimgs/studentsculpture.bmp", "jp2k/img2.bmp") and mos == pytest.approx(28.00384536)
    assert all(p.mos > 0 for p in pairs)  # DMOS 0 marks the dropped reference copies


def test_real_csiq(tmp_path):
    csiq_tree(tmp_path, meta("csiq/csiq_label.txt"))
    pairs = read_labels("csiq", tmp_path)
    assert len(pairs) == 866 and not pairs.higher_is_better and len({p.ref for p in pairs}) == 30
    assert triple(pairs[0], tmp_path) == ("src_imgs/1600.png", "dst_imgs/awgn/1600.AWGN.1.png", 0.061989)
    assert min(p.mos for p in pairs) == 0.0 and max(p.mos for p in pairs) == 1.0


def test_real_pipal_training_labels(tmp_path):
    pipal_tree(tmp_path, meta("pipal/Train_Label"))
    pairs = read_labels("pipal", tmp_path)
    assert len(pairs) == 23200 and len({p.ref for p in pairs}) == 200 and pairs.higher_is_better
    assert triple(pairs[0], tmp_path) == ("Train_Ref/A0001.bmp", "Distortion_1/A0001_00_00.bmp", 1520.0648)


def test_real_pipal_ntire2021_validation_list(tmp_path):
    label = meta("pipal/ntire2021_val/PIPAL_NTIRE_Valid_MOS.txt")
    names = [line.split(",")[0] for line in label.read_text().splitlines() if line.strip()]
    for name in names:
        touch(tmp_path / "Val_Dis" / name)
        touch(tmp_path / "Val_Ref" / f"{name[:5]}.bmp")
    pairs = read_labels("pipal", tmp_path, labels=str(label), ref_dir="Val_Ref", dist_dirs=["Val_Dis"])
    assert len(pairs) == 1000 and len({p.ref for p in pairs}) == 25
    assert (pairs[0].name, pairs[0].mos) == ("A0005_10_00.bmp", 1238.7325)


# ---- generated trees: every layout and option, with no shared data ------------------------------------------

def test_tid_crlf_no_final_newline_and_case(tmp_path):
    label = tmp_path / "labels.txt"
    label.write_bytes(b"5.51429 I01_01_1.bmp\r\n4.25 i02_03_4.bmp")  # the last line has no newline
    tid_tree(tmp_path / "tid", label, 2)
    pairs = read_labels("tid2013", tmp_path / "tid")
    assert [(p.name, p.mos) for p in pairs] == [("I01_01_1.bmp", 5.51429), ("i02_03_4.bmp", 4.25)]
    assert Path(pairs[1].dist).name == "I02_03_4.BMP" and Path(pairs[1].ref).name == "I02.BMP"


def test_live_generated_mat_files(tmp_path):
    total = sum(n for _, n in LIVE_FOLDERS)
    orgs = np.zeros((1, total), dtype=np.uint8)
    orgs[0, ::7] = 1
    dmos = np.linspace(10, 80, total).reshape(1, total)
    refnames = np.empty((1, total), dtype=object)
    for i in range(total):
        refnames[0, i] = np.array([f"ref{i % 3}.bmp"])
    savemat(tmp_path / "d.mat", {"dmos": dmos, "orgs": orgs})
    savemat(tmp_path / "r.mat", {"refnames_all": refnames})
    live_tree(tmp_path / "live", tmp_path / "d.mat", tmp_path / "r.mat")
    pairs = read_labels("live", tmp_path / "live")
    assert len(pairs) == total - len(range(0, total, 7))
    # entry 228 is jpeg/img1.bmp (after jp2k's 227), ref name from refnames_all[228]
    entry = next(p for p in pairs if p.name == "jpeg/img2.bmp")  # entry 228 is 7 * 32 + 4: kept
    assert entry.mos == pytest.approx(dmos[0, 228]) and Path(entry.ref).name == f"ref{228 % 3}.bmp"


def test_csiq_flat_folder(tmp_path):
    (tmp_path / "csiq_label.txt").write_text("1600.AWGN.1.png 0.06\nfisher.jpeg2000.3.png 0.5\n")
    for name in ("1600.AWGN.1.png", "fisher.jpeg2000.3.png"):
        touch(tmp_path / "dst_imgs_all" / name)
    touch(tmp_path / "src_imgs" / "1600.png")
    touch(tmp_path / "src_imgs" / "fisher.png")
    pairs = read_labels("csiq", tmp_path)
    assert [Path(p.dist).parent.name for p in pairs] == ["dst_imgs_all", "dst_imgs_all"]


def test_csiq_official_xlsx(tmp_path):
    openpyxl = pytest.importorskip("openpyxl")
    book = openpyxl.Workbook()
    book.active.title = "readme"
    sheet = book.create_sheet("all_by_image")
    sheet.append(["CSIQ DMOS"])
    sheet.append(["image", "dst_idx", "dst_type", "dst_lev", "dmos_std", "dmos"])
    sheet.append([1600, 1, "noise", 1, 0.061, 0.061989])
    sheet.append(["fisher", 5, "jpeg 2000", 3, 0.1, 0.5])
    sheet.append(["fisher", 6, "f noise", 2, 0.1, 0.25])
    book.save(tmp_path / "csiq.DMOS.xlsx")
    for folder in ("awgn", "jpeg", "jpeg2000", "fnoise", "blur", "contrast"):
        (tmp_path / "dst_imgs" / folder).mkdir(parents=True)
    for ref, folder, name in (("1600", "awgn", "1600.AWGN.1.png"), ("fisher", "jpeg2000", "fisher.jpeg2000.3.png"),
                              ("fisher", "fnoise", "fisher.fnoise.2.png")):
        touch(tmp_path / "dst_imgs" / folder / name)
        touch(tmp_path / "src_imgs" / f"{ref}.png")
    pairs = read_labels("csiq", tmp_path)
    assert [(p.name, p.mos) for p in pairs] == [("1600.AWGN.1.png", 0.061989), ("fisher.jpeg2000.3.png", 0.5),
                                               ("fisher.fnoise.2.png", 0.25)]


def test_csiq_xlsx_without_openpyxl_says_what_to_do(tmp_path, monkeypatch):
    import builtins

    real_import = builtins.__import__
    monkeypatch.setattr(builtins, "__import__",
                        lambda name, *a, **k: (_ for _ in ()).throw(ImportError()) if name == "openpyxl" else real_import(name, *a, **k))
    (tmp_path / "csiq.DMOS.xlsx").write_bytes(b"PK")
    (tmp_path / "src_imgs").mkdir()
    (tmp_path / "dst_imgs").mkdir()
    with pytest.raises(DatasetError, match="needs the optional package openpyxl.*csiq_label.txt"):
        read_labels("csiq", tmp_path)


def test_pipal_list_file_folders_and_unlabelled(tmp_path):
    (tmp_path / "PIPAL.txt").write_text("A0001_00_00.bmp,1520.5\nA0002_01_03.bmp,1400")
    touch(tmp_path / "Train_Dis" / "A0001_00_00.bmp")
    touch(tmp_path / "Train_Dis" / "A0002_01_03.bmp")
    touch(tmp_path / "Train_Ref" / "A0001.bmp")
    touch(tmp_path / "Train_Ref" / "A0002.bmp")
    pairs = read_labels("pipal", tmp_path, labels="PIPAL.txt", dist_dirs="Train_Dis")
    assert [(p.name, p.mos) for p in pairs] == [("A0001_00_00.bmp", 1520.5), ("A0002_01_03.bmp", 1400.0)]
    unlabelled = read_labels("pipal", tmp_path, labels=None, dist_dirs=["Train_Dis"])
    assert [p.name for p in unlabelled] == ["A0001_00_00.bmp", "A0002_01_03.bmp"]
    assert all(math.isnan(p.mos) for p in unlabelled) and not unlabelled.labelled


def test_custom_csv(tmp_path):
    (tmp_path / "pairs.csv").write_text("ref,dist,mos\nrefs/a.png,dist/a_1.png,3.5\nrefs/a.png,dist/A_2.PNG,1.25\n")
    touch(tmp_path / "refs" / "a.png")
    touch(tmp_path / "dist" / "a_1.png")
    touch(tmp_path / "dist" / "a_2.png")
    pairs = read_labels("csv", tmp_path, labels="pairs.csv", higher_is_better=False)
    assert [(p.name, p.mos) for p in pairs] == [("dist/a_1.png", 3.5), ("dist/A_2.PNG", 1.25)]
    assert not pairs.higher_is_better and Path(pairs[1].dist).name == "a_2.png"


# ---- bad input: one error that names the file, line or folder ------------------------------------------------

def _tid(tmp_path, content: bytes, refs=2, make=True):
    label = tmp_path / "labels.txt"
    label.write_bytes(content)
    root = tmp_path / "tid"
    if make:
        tid_tree(root, label, refs)
    else:
        root.mkdir()
        (root / "mos_with_names.txt").write_bytes(content)
        (root / "reference_images").mkdir()
        (root / "distorted_images").mkdir()
    return root


def test_all_missing_files_reported_at_once(tmp_path):
    root = _tid(tmp_path, b"".join(b"5.0 i01_01_%d.bmp\n" % i for i in range(1, 8)), make=False)
    with pytest.raises(DatasetError) as err:
        read_labels("tid2013", root)
    message = str(err.value)
    assert "14 listed images not found" in message and "i01_01_1.bmp" in message and "(14 in all)" in message


def test_bad_lines_named_with_file_and_line(tmp_path):
    root = _tid(tmp_path, b"5.0 i01_01_1.bmp\nfive i01_01_2.bmp\n4.0 i01_01_3.bmp extra\nnan i01_01_4.bmp\n"
                          b"3.0 i01_01_1.bmp\n")
    with pytest.raises(DatasetError) as err:
        read_labels("tid2013", root)
    message = str(err.value)
    assert "4 problems in the labels" in message
    assert "mos_with_names.txt:2: score 'five' is not a number" in message
    assert "mos_with_names.txt:3: expected '<mos> <name>'" in message
    assert "mos_with_names.txt:4: score is nan, not a finite number" in message
    assert "mos_with_names.txt:5: distorted image 'i01_01_1.bmp' is listed twice (first at" in message


def test_empty_label_file(tmp_path):
    root = _tid(tmp_path, b"\r\n", make=False)
    with pytest.raises(DatasetError, match="holds no labels"):
        read_labels("tid2013", root)


def test_missing_folder_names_the_option(tmp_path):
    (tmp_path / "Train_Label").mkdir()
    (tmp_path / "Train_Ref").mkdir()
    with pytest.raises(DatasetError, match="Distortion_1.*'dist_dirs' option"):
        read_labels("pipal", tmp_path)


def test_unknown_dataset_option_and_root(tmp_path):
    with pytest.raises(DatasetError, match="dataset must be one of pipal, live, .*, got 'koniq'"):
        read_labels("koniq", tmp_path)
    with pytest.raises(DatasetError, match="unknown option\\(s\\) ref_folder for dataset 'tid2013'.*ref_dir"):
        read_labels("tid2013", tmp_path, ref_folder="x")
    with pytest.raises(DatasetError, match="root folder .*nowhere does not exist"):
        read_labels("live", tmp_path / "nowhere")
    with pytest.raises(DatasetError, match="label file .*mos_with_names.txt not found"):
        (tmp_path / "reference_images").mkdir()
        (tmp_path / "distorted_images").mkdir()
        read_labels("tid2013", tmp_path)
