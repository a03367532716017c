"""Label readers for the full-reference IQA datasets, in the layouts their authors distribute.

Each reader returns a ``Pairs`` list of ``Pair(ref, dist, mos, name, distortion, mos_ci95)`` with absolute paths
of files that exist (names resolved case-insensitively), the published score as ``mos`` and the distortion type
as the dataset names it (ahiq.registry.datasets). Every problem found is reported at once (ahiq.data.labels).
``ahiq.data.labels.read_labels`` picks the reader its dataset declares.
"""
from __future__ import annotations

import csv
import math
import os
from pathlib import Path
from statistics import NormalDist
from typing import Callable, Iterable, Iterator

import numpy as np

from ahiq.data.labels import Folders, Labels
from ahiq.data.pairs import DatasetError, Pair, Pairs
from ahiq.messages import listed
from ahiq.registry.datasets import DATASETS


def _path(root: Path, name: str | os.PathLike) -> Path:
    return Path(name) if Path(name).is_absolute() else root / name


def coded(name: str) -> str:
    """The distortion's code in the middle of a name of three ``_``-separated fields: PIPAL's ``bb`` of
    ``A0001_bb_cc.bmp``, TID's ``TT`` of ``i01_TT_1.bmp``, KADID-10k's of ``I01_TT_01.png``, the demo's
    ``R000_jpeg_4.png``; "" for a name of another form."""
    fields = Path(name).stem.split("_")
    return fields[1] if len(fields) == 3 else ""


# ---- PIPAL ----------------------------------------------------------------------------------------------

PIPAL_DIST_DIRS = ("Distortion_1", "Distortion_2", "Distortion_3", "Distortion_4")


def read_pipal(root: Path, labels: str | None = "Train_Label", ref_dir: str = "Train_Ref",
               dist_dirs: Iterable[str] = PIPAL_DIST_DIRS) -> Pairs:
    """PIPAL (Elo, higher is better). ``labels``: a folder of per-reference files (``Train_Label/A0001.txt``),
    or one ``name,score`` list file (the official ``PIPAL.txt``, the NTIRE 2021 validation MOS file), or None
    for an unlabelled set (NTIRE 2022 validation/test): every image in ``dist_dirs``.
    The reference of ``A0001_00_00.bmp`` is ``A0001.bmp``."""
    dist_dirs = [dist_dirs] if isinstance(dist_dirs, (str, os.PathLike)) else list(dist_dirs)
    refs = Folders(root, [ref_dir], "PIPAL reference", "ref_dir")
    dists = Folders(root, dist_dirs, "PIPAL distorted-image", "dist_dirs")
    if labels is None:
        out = []
        missing = []
        for dist in dists.images():
            ref = refs.find(dist.name[:5] + ".bmp")
            if ref is None:
                missing.append(f"{dist.name[:5]}.bmp (reference of {dist.name})")
            else:
                out.append(Pair(str(ref), str(dist), float("nan"), dist.name, coded(dist.name)))
        if missing:
            raise DatasetError(f"PIPAL references not found in {refs.description}: {listed(missing, 5)}")
        if not out:
            raise DatasetError(f"no images in {dists.description}")
        return Pairs(out, True, "pipal")
    label_path = _path(root, labels)
    if not label_path.exists():
        raise DatasetError(f"PIPAL labels {label_path} not found (a folder of A####.txt files or one list file; "
                           f"option 'labels', or labels: null for an unlabelled set)")
    files = sorted(label_path.glob("*.txt")) if label_path.is_dir() else [label_path]
    if not files:
        raise DatasetError(f"PIPAL label folder {label_path} holds no .txt files")
    reader = Labels(label_path)
    for file in files:
        for number, line in reader.lines(file):
            where = f"{file}:{number}"
            fields = line.split(",")
            if len(fields) != 2:
                reader.errors.append(f"{where}: expected 'name,score', got '{line}'")
                continue
            name = fields[0].strip()
            reader.add(where, name, refs.find(name[:5] + ".bmp"), dists.find(name), reader.score(fields[1], where),
                       name[:5] + ".bmp", dists.description, coded(name))
    return reader.result(True, "pipal")


# ---- LIVE ------------------------------------------------------------------------------------------------

LIVE_FOLDERS = (("jp2k", 227), ("jpeg", 233), ("wn", 174), ("gblur", 174), ("fastfading", 174))


def read_live(root: Path, dmos_file: str = "dmos.mat", refnames_file: str = "refnames_all.mat",
              ref_dir: str = "refimgs") -> Pairs:
    """LIVE release 2 (DMOS, lower is better): 982 entries in folder order jp2k, jpeg, wn, gblur,
    fastfading, ``img<N>.bmp`` numbered within each folder; entries with ``orgs == 1`` (reference copies)
    are dropped, leaving 779 pairs."""
    from scipy.io import loadmat

    paths = {"dmos": _path(root, dmos_file), "refnames": _path(root, refnames_file)}
    for path in paths.values():
        if not path.is_file():
            raise DatasetError(f"LIVE label file {path} not found")
    mat = loadmat(paths["dmos"])
    names = loadmat(paths["refnames"])
    for key, source in (("dmos", mat), ("orgs", mat), ("refnames_all", names)):
        if key not in source:
            raise DatasetError(f"LIVE file {paths['refnames' if key == 'refnames_all' else 'dmos']} has no '{key}'")
    dmos, orgs = mat["dmos"].ravel(), mat["orgs"].ravel()
    refnames = [str(np.asarray(r).ravel()[0]) for r in names["refnames_all"].ravel()]
    total = sum(n for _, n in LIVE_FOLDERS)
    if not len(dmos) == len(orgs) == len(refnames) == total:
        raise DatasetError(f"LIVE release 2 has {total} entries; {paths['dmos']} and {paths['refnames']} hold "
                           f"{len(dmos)} DMOS, {len(orgs)} orgs and {len(refnames)} reference names")
    refs = Folders(root, [ref_dir], "LIVE reference", "ref_dir")
    folders = {name: Folders(root, [name], f"LIVE {name}", "root") for name, _ in LIVE_FOLDERS}
    reader = Labels(paths["dmos"])
    index = 0
    for folder, count in LIVE_FOLDERS:
        for number in range(1, count + 1):
            if not orgs[index]:
                name = f"{folder}/img{number}.bmp"
                where = f"{paths['dmos']} entry {index + 1}"
                mos = reader.score(str(dmos[index]), where)
                reader.add(where, name, refs.find(refnames[index]), folders[folder].find(f"img{number}.bmp"),
                           mos, refnames[index], str(root / folder), folder)
            index += 1
    return reader.result(False, "live")


# ---- CSIQ ------------------------------------------------------------------------------------------------

CSIQ_TYPES = {code.lower(): code for code in DATASETS["csiq"].taxonomy.types}  # any case -> the distributed one
CSIQ_FOLDERS = {"awgn": "awgn", "jpeg": "jpeg", "jpeg2000": "jpeg2000", "fnoise": "fnoise", "blur": "blur",
                "contrast": "contrast"}  # distortion token (any case) -> folder under dst_imgs/


def _csiq_xlsx_rows(path: Path) -> Iterator[tuple[int, str, float | str]]:
    try:
        import openpyxl
    except ImportError:
        raise DatasetError(f"reading {path} needs the optional package openpyxl (pip install openpyxl), or "
                           f"give the labels as a text file of '<distorted name> <dmos>' lines "
                           f"(option 'labels', e.g. csiq_label.txt)") from None
    # dst_type as the sheet writes it (spaces dropped) -> the token in the image file names
    tokens = {"noise": "AWGN", "awgn": "AWGN", "jpeg": "JPEG", "jpeg2000": "jpeg2000", "fnoise": "fnoise",
              "blur": "BLUR", "contrast": "contrast"}
    book = openpyxl.load_workbook(path, read_only=True, data_only=True)
    if "all_by_image" not in book.sheetnames:
        raise DatasetError(f"{path} has no sheet 'all_by_image' (sheets: {', '.join(book.sheetnames)})")
    header = None
    for number, row in enumerate(book["all_by_image"].iter_rows(values_only=True), start=1):
        cells = [str(c).strip().lower() if c is not None else "" for c in row]
        if header is None:
            if {"image", "dst_type", "dst_lev", "dmos"} <= set(cells):
                header = {name: cells.index(name) for name in ("image", "dst_type", "dst_lev", "dmos")}
            continue
        if not cells[header["image"]]:
            continue
        image = cells[header["image"]].removesuffix(".0")
        kind = cells[header["dst_type"]].replace(" ", "")
        token = tokens.get(kind, kind)
        level = cells[header["dst_lev"]].removesuffix(".0")
        yield number, f"{image}.{token}.{level}.png", row[header["dmos"]]
    if header is None:
        raise DatasetError(f"{path}: sheet 'all_by_image' has no header row with image, dst_type, dst_lev, dmos")


def read_csiq(root: Path, labels: str | None = None, ref_dir: str = "src_imgs", dist_dir: str | None = None) -> Pairs:
    """CSIQ (DMOS in [0, 1], lower is better): ``src_imgs/<ref>.png`` and
    ``dst_imgs/<folder>/<ref>.<TOKEN>.<level>.png`` (or a flat ``dst_imgs_all/``); labels from
    ``csiq_label.txt`` (``<distorted name> <dmos>`` lines) or the official ``csiq.DMOS.xlsx``."""
    if labels is None:
        labels = next((n for n in ("csiq_label.txt", "csiq.DMOS.xlsx") if (root / n).is_file()), "csiq_label.txt")
    label_path = _path(root, labels)
    if dist_dir is None:
        dist_dir = "dst_imgs_all" if (root / "dst_imgs_all").is_dir() and not (root / "dst_imgs").is_dir() else "dst_imgs"
    refs = Folders(root, [ref_dir], "CSIQ reference", "ref_dir")
    flat = not any((root / dist_dir / f).is_dir() for f in CSIQ_FOLDERS.values())
    if flat:
        dists = {None: Folders(root, [dist_dir], "CSIQ distorted-image", "dist_dir")}
    else:
        dists = {f: Folders(root / dist_dir, [f], "CSIQ distorted-image", "dist_dir") for f in CSIQ_FOLDERS.values()}
    reader = Labels(label_path)
    if label_path.suffix.lower() == ".xlsx":
        rows = _csiq_xlsx_rows(label_path)
    else:
        rows = ((n, *line.rsplit(None, 1)) if len(line.split()) == 2 else (n, line, None)
                for n, line in reader.lines())
    for number, name, value in rows:
        where = f"{label_path}:{number}"
        if value is None:
            reader.errors.append(f"{where}: expected '<distorted name> <dmos>', got '{name}'")
            continue
        parts = name.split(".")
        if len(parts) != 4 or (not flat and parts[1].lower() not in CSIQ_FOLDERS):
            reader.errors.append(f"{where}: '{name}' is not a CSIQ name '<ref>.<TOKEN>.<level>.png' "
                                 f"with a token in {', '.join(CSIQ_FOLDERS)}")
            continue
        folder = dists[None if flat else CSIQ_FOLDERS[parts[1].lower()]]
        reader.add(where, name, refs.find(parts[0] + ".png"), folder.find(name), reader.score(str(value), where),
                   parts[0] + ".png", folder.description, CSIQ_TYPES.get(parts[1].lower(), parts[1]))
    return reader.result(False, "csiq")


# ---- TID2013 / TID2008 -------------------------------------------------------------------------------------

TID_STD_FILE = "mos_std.txt"
NORMAL_95 = NormalDist().inv_cdf(0.975)  # 1.96: a 95% interval's half-width in standard errors


def _read_tid(dataset: str, root: Path, labels: str, ref_dir: str, dist_dir: str, std_file: str | None = None) -> Pairs:
    refs = Folders(root, [ref_dir], f"{dataset} reference", "ref_dir")
    dists = Folders(root, [dist_dir], f"{dataset} distorted-image", "dist_dir")
    reader = Labels(_path(root, labels))
    lines = list(reader.lines())
    spreads = _tid_spreads(reader, len(lines), _path(root, std_file), std_file != TID_STD_FILE) if std_file else None
    for count, (number, line) in enumerate(lines):
        where = f"{reader.path}:{number}"
        fields = line.split()
        if len(fields) != 2:
            reader.errors.append(f"{where}: expected '<mos> <name>', got '{line}'")
            continue
        mos, name = reader.score(fields[0], where), fields[1]
        ref_name = name.split("_")[0] + ".bmp"  # i01_01_1.bmp -> I01.BMP on disk
        ci95 = NORMAL_95 * spreads[count] if spreads else math.nan
        reader.add(where, name, refs.find(ref_name), dists.find(name), mos, ref_name, dists.description, coded(name),
                   ci95)
    return reader.result(True, dataset)


def _tid_spreads(reader: Labels, labels: int, path: Path, required: bool) -> list[float] | None:
    """TID2013's ``mos_std.txt``: the standard deviation of each MOS, line by line beside the label file's lines;
    None when the default file is absent (a copy without it)."""
    if not path.is_file():
        if required:
            raise DatasetError(f"TID standard-deviation file {path} not found (option 'std_file'; null for none)")
        return None
    values = [reader.score(line, f"{path}:{number}") for number, line in reader.lines(path)]
    if len(values) != labels:
        raise DatasetError(f"{path} holds {len(values)} standard deviations for the {labels} labels of {reader.path}: "
                           f"they must match line by line (or set std_file: null)")
    bad = [f"{path}:{i + 1}" for i, v in enumerate(values) if v is not None and v < 0]
    if bad:
        reader.errors.append(f"{bad[0]}: a standard deviation below 0")
    return [math.nan if v is None else v for v in values]


def read_tid2013(root: Path, labels: str = "mos_with_names.txt", ref_dir: str = "reference_images",
                 dist_dir: str = "distorted_images", std_file: str | None = TID_STD_FILE) -> Pairs:
    """TID2013 (MOS, higher is better): ``mos_with_names.txt`` lines ``<mos> <name>``; 3,000 pairs. With
    ``mos_std.txt`` beside it (each MOS's standard deviation), each pair's 95% interval 1.96 of them."""
    return _read_tid("tid2013", root, labels, ref_dir, dist_dir, std_file)


def read_tid2008(root: Path, labels: str = "mos_with_names.txt", ref_dir: str = "reference_images",
                 dist_dir: str = "distorted_images") -> Pairs:
    """TID2008 (MOS, higher is better): the layout of TID2013; 1,700 pairs."""
    return _read_tid("tid2008", root, labels, ref_dir, dist_dir)


# ---- KADID-10k and custom CSV -----------------------------------------------------------------------------

def _read_csv(dataset: str, root: Path, labels: str, columns: tuple[str, str, str], higher_is_better: bool,
              ref_folder: Folders | None = None, dist_folder: Folders | None = None,
              described: Callable[[dict[str, str], str], tuple[str, float]] | None = None) -> Pairs:
    """``described(row, where)``: the row's distortion code and MOS interval (the row by column name)."""
    reader = Labels(_path(root, labels))
    with open(reader.path, encoding="utf-8-sig", newline="") as f:
        rows = csv.reader(f)
        header = [h.strip() for h in next(rows, [])]
        absent = [c for c in columns if c not in header]
        if absent:
            raise DatasetError(f"{reader.path}: no column {', '.join(absent)} in the header ({', '.join(header)})")
        ref_col, dist_col, mos_col = (header.index(c) for c in columns)
        for number, row in enumerate(rows, start=2):
            where = f"{reader.path}:{number}"
            if not any(cell.strip() for cell in row):
                continue
            if len(row) < len(header):
                reader.errors.append(f"{where}: {len(row)} fields, the header has {len(header)}")
                continue
            ref_name, dist_name = row[ref_col].strip(), row[dist_col].strip()
            if ref_folder is None:  # paths relative to the root; case-insensitive only within the last folder
                ref = _find_relative(root, ref_name)
                dist = _find_relative(root, dist_name)
                folder = str(root / Path(dist_name).parent)
            else:
                ref, dist, folder = ref_folder.find(ref_name), dist_folder.find(dist_name), dist_folder.description
            try:
                kind, ci95 = described(dict(zip(header, row)), where) if described else ("", math.nan)
            except ValueError as exc:
                reader.errors.append(str(exc))
                continue
            reader.add(where, dist_name, ref, dist, reader.score(row[mos_col], where), ref_name, folder, kind, ci95)
    return reader.result(higher_is_better, dataset)


def _find_relative(root: Path, name: str) -> Path | None:
    path = _path(root, name)
    if path.is_file():
        return path.resolve()
    if not path.parent.is_dir():
        return None
    match = next((e for e in os.scandir(path.parent) if e.name.lower() == path.name.lower() and e.is_file()), None)
    return Path(match.path).resolve() if match else None


KADID_RATINGS = 30  # ratings per image (the KADID-10k paper): its "var" is their variance


def read_kadid10k(root: Path, labels: str = "dmos.csv", image_dir: str = "images") -> Pairs:
    """KADID-10k (a 1..5 rating named "dmos", higher is better): ``dmos.csv`` with header
    ``dist_img,ref_img,dmos,var``, references and distorted images together in ``images/``; 10,125 pairs. Each
    MOS's 95% interval from its ratings' variance: t(0.975, 29) * sqrt(var / 30)."""
    from scipy import stats

    t95 = float(stats.t.ppf(0.975, KADID_RATINGS - 1))
    images = Folders(root, [image_dir], "KADID-10k image", "image_dir")

    def described(row: dict[str, str], where: str) -> tuple[str, float]:
        kind = coded(row["dist_img"].strip())
        text = (row.get("var") or "").strip()
        if not text:
            return kind, math.nan
        try:
            variance = float(text)
        except ValueError:
            variance = math.nan
        if not (math.isfinite(variance) and variance >= 0):
            raise ValueError(f"{where}: var '{text}' is not a non-negative number")
        return kind, t95 * math.sqrt(variance / KADID_RATINGS)

    return _read_csv("kadid10k", root, labels, ("ref_img", "dist_img", "dmos"), True, images, images, described)


def read_custom_csv(root: Path, labels: str, higher_is_better: bool = True, ref_column: str = "ref",
                    dist_column: str = "dist", mos_column: str = "mos", group_column: str = "group") -> Pairs:
    """Your own data: a CSV with ``ref,dist,mos`` columns, image paths relative to ``root``; an optional
    ``group`` column names each pair's distortion type (test.py's per-group tables)."""
    return _read_csv("csv", root, labels, (ref_column, dist_column, mos_column), higher_is_better,
                     described=lambda row, where: (row.get(group_column, "").strip(), math.nan))
