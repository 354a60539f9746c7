"""Label manifests: ChestX-ray14's and CheXpert's CSV layouts on small hand-written copies, the
uncertain and blank policies, single-label class columns, path resolution, the hold-out by
group, and every mistake in a manifest that a user can fix."""

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from densenet.errors import UsageError
from densenet.labels import (BLANK, METADATA_COLUMNS, PATH_COLUMNS, UNCERTAIN, LabelTable,
                             holdout_by_group, read_csv)

NIH_HEADER = ("Image Index,Finding Labels,Follow-up #,Patient ID,Patient Age,Patient Gender,"
              "View Position,OriginalImage[Width,Height],OriginalImagePixelSpacing[x,y]")
CHEXPERT_HEADER = "Path,Sex,Age,Frontal/Lateral,AP/PA,No Finding,Cardiomegaly,Edema"


def _write(path: Path, text: str, encoding="utf-8") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding=encoding)
    return path


def _touch(folder: Path, *names: str) -> None:
    for n in names:
        p = folder / n
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(b"")


# ----------------------------------------------------------------------------- ChestX-ray14

NIH_ROWS = [
    "00000001_000.png,Cardiomegaly|Effusion,0,1,58,M,PA,2682,2749,0.143,0.143",
    "00000001_001.png,No Finding,1,1,58,M,PA,2894,2729,0.143,0.143",
    "00000002_000.png,Effusion,0,2,81,M,AP,2500,2048,0.168,0.168",
    "00000003_000.png,Atelectasis | Cardiomegaly,0,3,74,F,PA,2500,2048,0.168,0.168",
]


def _nih(tmp_path, rows=NIH_ROWS, header=NIH_HEADER, name="Data_Entry_2017.csv"):
    return _write(tmp_path / name, "\n".join([header, *rows]) + "\n")


def test_nih_layout(tmp_path):
    csv_path = _nih(tmp_path)
    _touch(tmp_path / "images", *(r.split(",")[0] for r in NIH_ROWS))
    t = read_csv(csv_path, image_root=tmp_path / "images", group_column="Patient ID")
    assert t.multi_label and len(t) == 4
    assert t.names == ("Atelectasis", "Cardiomegaly", "Effusion")  # sorted, No Finding not a label
    np.testing.assert_array_equal(t.targets, np.array(
        [[0, 1, 1], [0, 0, 0], [0, 0, 1], [1, 1, 0]], dtype=np.float32))
    assert t.targets.dtype == np.float32
    np.testing.assert_array_equal(t.mask, np.ones((4, 3), dtype=bool))
    assert t.paths == tuple(str(tmp_path / "images" / r.split(",")[0]) for r in NIH_ROWS)
    assert t.groups == ("1", "1", "2", "3")
    assert t.source == str(csv_path)


def test_nih_trailing_comma(tmp_path):
    # the distributed Data_Entry_2017.csv ends its lines with a comma: an unnamed 12th column
    csv_path = _nih(tmp_path, header=NIH_HEADER + ",", rows=[NIH_ROWS[0] + ",", NIH_ROWS[2]])
    t = read_csv(csv_path, check_files=False)
    assert t.names == ("Cardiomegaly", "Effusion")
    np.testing.assert_array_equal(t.targets, np.array([[1, 1], [0, 1]], dtype=np.float32))


def test_separated_column_options(tmp_path):
    csv_path = _write(tmp_path / "m.csv", "file,tags\na.png,dog;cat\nb.png,none\nc.png,cat\n")
    t = read_csv(csv_path, path_column="file", labels_column="tags", separator=";",
                 none_value="none", check_files=False)
    assert t.names == ("cat", "dog")
    np.testing.assert_array_equal(t.targets, np.array([[1, 1], [0, 0], [1, 0]], dtype=np.float32))


def test_metadata_columns_cover_both_formats():
    for c in ("Patient ID", "Patient Age", "View Position", "OriginalImage[Width", "y]",
              "Sex", "Age", "Frontal/Lateral", "AP/PA"):
        assert c in METADATA_COLUMNS
    for c in ("No Finding", "Cardiomegaly", "Finding Labels"):
        assert c not in METADATA_COLUMNS
    assert PATH_COLUMNS == ("path", "Path", "Image Index")
    assert UNCERTAIN == ("ignore", "ones", "zeros") and BLANK == ("negative", "ignore")


# ----------------------------------------------------------------------------- CheXpert

CHEXPERT_ROWS = [
    # No Finding, Cardiomegaly, Edema
    "CheXpert-v1.0-small/train/patient00001/study1/view1_frontal.jpg,Female,68,Frontal,AP,1.0,,",
    "CheXpert-v1.0-small/train/patient00002/study2/view1_frontal.jpg,Female,87,Frontal,AP,,-1.0,1.0",
    "CheXpert-v1.0-small/train/patient00002/study1/view2_lateral.jpg,Female,83,Lateral,,,0.0,-1.0",
    "CheXpert-v1.0-small/train/patient00003/study1/view1_frontal.jpg,Male,41,Frontal,AP, 0 ,1, -1 ",
]
# codes per cell: 1 positive, 0 negative, -1 uncertain, 2 blank
CHEXPERT_CODES = np.array([[1, 2, 2], [2, -1, 1], [2, 0, -1], [0, 1, -1]])


def _chexpert(tmp_path):
    csv_path = _write(tmp_path / "CheXpert-v1.0-small" / "train.csv",
                      "\n".join([CHEXPERT_HEADER, *CHEXPERT_ROWS]) + "\n")
    _touch(tmp_path, *(r.split(",")[0] for r in CHEXPERT_ROWS))
    return csv_path


@pytest.mark.parametrize("uncertain", UNCERTAIN)
@pytest.mark.parametrize("blank", BLANK)
def test_chexpert_policies(tmp_path, uncertain, blank):
    t = read_csv(_chexpert(tmp_path), image_root=tmp_path, uncertain=uncertain, blank=blank)
    assert t.names == ("No Finding", "Cardiomegaly", "Edema")  # file order, metadata left out
    c = CHEXPERT_CODES
    expected_targets = {
        "ignore": [[1, 0, 0], [0, 0, 1], [0, 0, 0], [0, 1, 0]],
        "zeros": [[1, 0, 0], [0, 0, 1], [0, 0, 0], [0, 1, 0]],
        "ones": [[1, 0, 0], [0, 1, 1], [0, 0, 1], [0, 1, 1]],
    }[uncertain]
    np.testing.assert_array_equal(t.targets, np.array(expected_targets, dtype=np.float32))
    expected_mask = np.ones(c.shape, dtype=bool)
    if uncertain == "ignore":
        expected_mask &= c != -1
    if blank == "ignore":
        expected_mask &= c != 2
    np.testing.assert_array_equal(t.mask, expected_mask)
    assert t.targets.dtype == np.float32 and t.mask.dtype == bool


def test_chexpert_mask_spelled_out(tmp_path):
    # the same as above for the two "ignore" policies, written out rather than derived
    t = read_csv(_chexpert(tmp_path), image_root=tmp_path, uncertain="ignore", blank="ignore")
    np.testing.assert_array_equal(t.mask, np.array(
        [[True, False, False], [False, False, True], [False, True, False], [True, True, False]]))


def test_label_columns_choose_and_order(tmp_path):
    t = read_csv(_chexpert(tmp_path), image_root=tmp_path, label_columns=["Edema", "Cardiomegaly"])
    assert t.names == ("Edema", "Cardiomegaly")
    np.testing.assert_array_equal(t.targets, np.array([[0, 0], [1, 0], [0, 0], [0, 1]],
                                                      dtype=np.float32))


def test_single_label_class_column(tmp_path):
    _touch(tmp_path, "a.png", "b.png", "c.png", "d.png")
    csv_path = _write(tmp_path / "labels.csv",
                      "path,label\na.png,dog\nb.png,cat\nc.png, bird \nd.png,cat\n")
    t = read_csv(csv_path)
    assert not t.multi_label and t.mask is None
    assert t.names == ("bird", "cat", "dog")
    np.testing.assert_array_equal(t.targets, np.array([2, 1, 0, 1], dtype=np.int64))
    assert t.targets.dtype == np.int64


def test_relative_paths(tmp_path):
    data = tmp_path / "data"
    _touch(data, "img/a.png", "img/b.png")
    _touch(tmp_path / "elsewhere", "a.png")
    # against the CSV's folder
    t = read_csv(_write(data / "m.csv", "path,label\nimg/a.png,x\n./img/../img/b.png,y\n"))
    assert t.paths == (str(data / "img" / "a.png"), str(data / "img" / "b.png"))
    # against image_root, and an absolute path kept as it is
    t = read_csv(_write(data / "n.csv", f"path,label\na.png,x\n{data / 'img' / 'b.png'},y\n"),
                 image_root=tmp_path / "elsewhere")
    assert t.paths == (str(tmp_path / "elsewhere" / "a.png"), str(data / "img" / "b.png"))


def test_bom_header(tmp_path):
    _touch(tmp_path, "a.png", "b.png")
    csv_path = _write(tmp_path / "m.csv", "Path,Cardiomegaly\r\na.png,1.0\r\nb.png,0.0\r\n",
                      encoding="utf-8-sig")
    assert csv_path.read_bytes()[:3] == b"\xef\xbb\xbf"
    t = read_csv(csv_path)
    assert t.names == ("Cardiomegaly",) and t.multi_label
    np.testing.assert_array_equal(t.targets, np.array([[1], [0]], dtype=np.float32))


def test_blank_lines_skipped(tmp_path):
    csv_path = _write(tmp_path / "m.csv", "path,label\na.png,x\n\n,\nb.png,y\n")
    t = read_csv(csv_path, check_files=False)
    assert len(t) == 2 and t.names == ("x", "y")


def test_subset(tmp_path):
    csv_path = _nih(tmp_path)
    t = read_csv(csv_path, check_files=False, group_column="Patient ID")
    s = t.subset([3, 0])
    assert isinstance(s, LabelTable) and len(s) == 2
    assert s.paths == (t.paths[3], t.paths[0]) and s.groups == ("3", "1") and s.names == t.names
    np.testing.assert_array_equal(s.targets, np.array([[1, 1, 0], [0, 1, 1]], dtype=np.float32))
    np.testing.assert_array_equal(s.mask, np.ones((2, 3), dtype=bool))
    b = t.subset(np.array([False, True, True, False]))
    assert b.paths == t.paths[1:3]
    assert len(t.subset([])) == 0
    single = read_csv(_write(tmp_path / "s.csv", "path,label\na,x\nb,y\nc,x\n"), check_files=False)
    s = single.subset(np.array([2, 1]))
    assert s.mask is None and s.groups is None
    np.testing.assert_array_equal(s.targets, np.array([0, 1], dtype=np.int64))


# ----------------------------------------------------------------------------- hold-out by group

GROUPS = tuple(f"p{i}" for i in [0, 0, 0, 1, 2, 2, 3, 4, 4, 4, 4, 5, 6, 6, 7, 8, 9, 9, 9, 10])


def test_holdout_by_group():
    train, val = holdout_by_group(GROUPS, 5, seed=0)
    assert train.dtype == np.int64 and val.dtype == np.int64
    np.testing.assert_array_equal(np.sort(np.concatenate([train, val])), np.arange(len(GROUPS)))
    np.testing.assert_array_equal(train, np.sort(train))
    np.testing.assert_array_equal(val, np.sort(val))
    assert len(val) >= 5
    assert not {GROUPS[i] for i in train} & {GROUPS[i] for i in val}
    # groups in default_rng(seed)'s order over the sorted group names, taken until >= val_size
    names = sorted(set(GROUPS))
    taken, size = set(), 0
    for k in np.random.default_rng(0).permutation(len(names)):
        if size >= 5:
            break
        taken.add(names[k])
        size += GROUPS.count(names[k])
    np.testing.assert_array_equal(val, [i for i, g in enumerate(GROUPS) if g in taken])
    again = holdout_by_group(GROUPS, 5, seed=0)
    np.testing.assert_array_equal(again[0], train)
    np.testing.assert_array_equal(again[1], val)
    others = [holdout_by_group(GROUPS, 5, seed=s)[1] for s in range(1, 6)]
    assert any(not np.array_equal(o, val) for o in others)


def test_holdout_by_group_zero_and_errors():
    train, val = holdout_by_group(GROUPS, 0, seed=0)
    np.testing.assert_array_equal(train, np.arange(len(GROUPS)))
    assert val.dtype == np.int64 and len(val) == 0
    with pytest.raises(UsageError, match=r"cannot hold out 20 of 20"):
        holdout_by_group(GROUPS, 20, seed=0)
    with pytest.raises(UsageError, match=r"cannot hold out -1"):
        holdout_by_group(GROUPS, -1, seed=0)
    with pytest.raises(UsageError, match=r"would take all 2 groups"):
        holdout_by_group(["a", "a", "b", "b"], 3, seed=0)
    with pytest.raises(UsageError, match=r"group_column"):
        holdout_by_group(None, 3, seed=0)


# ----------------------------------------------------------------------------- mistakes

@pytest.mark.parametrize("text, options, match", [
    # the file itself
    ("", {}, r"m\.csv is empty or its first line is blank"),
    ("path,label\n", {}, r"m\.csv has a header line but no rows"),
    ("path,label,path\na,x,b\n", {}, r"line 1: the header names the column 'path' more than once"),
    ("path,label\na,x\nb,y,z\n", {}, r"m\.csv, line 3: 3 fields, but the header has 2"),
    ('path,label\na,"x\n', {}, r"m\.csv, line \d+: not readable as CSV"),
    # paths
    ("file,label\na,x\n", {"path_column": "image"},
     r"no column 'image' \(path_column\); its columns are 'file', 'label'"),
    ("file,label\na,x\n", {}, r"no image path column .*its columns are 'file', 'label'\. Pass path_column"),
    ("path,label\na,x\n ,y\n", {}, r"m\.csv, line 3: the 'path' cell is empty"),
    ("path,label\na,x\nb,y\n./a,z\n", {}, r"m\.csv: lines 2 and 4 both list the image \./a"),
    # one column of separated names
    ("path,tags\na,x\n", {"labels_column": "labels"}, r"no column 'labels' \(labels_column\)"),
    (f"{NIH_HEADER}\n{NIH_ROWS[0]}\n{NIH_ROWS[1].replace('No Finding', '')}\n", {},
     r"m\.csv, line 3: the 'Finding Labels' cell is empty; write 'No Finding'"),
    (f"{NIH_HEADER}\n{NIH_ROWS[0]}\n{NIH_ROWS[1].replace('No Finding', 'No Finding|Effusion')}\n", {},
     r"m\.csv, line 3: the 'Finding Labels' cell 'No Finding\|Effusion' says 'No Finding' and names"),
    (f"{NIH_HEADER}\n{NIH_ROWS[1]}\n", {}, r"every 'Finding Labels' cell is 'No Finding'"),
    # one column per label
    ("Path,Edema\na,1.0\n", {"label_columns": ["Edema", "Effusion"]},
     r"no column 'Effusion' \(label_columns\); its columns are 'Path', 'Edema'"),
    ("Path,Edema\na,1.0\n", {"label_columns": ["Edema", "Edema"]}, r"lists 'Edema' more than once"),
    ("Path,Edema\na,1.0\n", {"label_columns": ["Path", "Edema"]}, r"label_columns includes 'Path'"),
    ("Path,Study,Edema\na,s1,1.0\nb,s2,0.0\nc,s3,yes\n", {},
     r"m\.csv, line 2, column 'Study': 's1' is not a label value.*pass label_columns"),
    ("Path,Edema,Effusion\na,1.0,0\nb,0.0,2\n", {},
     r"m\.csv, line 3, column 'Effusion': '2' is not a label value; a label column holds 1 or 1\.0"),
    ("Path,Edema,Effusion\na,1.0,\nb,0.0, \n", {},
     r"every cell of the column 'Effusion' is blank.*delete the column, or pass label_columns"),
    ("Path,Sex,Age,AP/PA\na,Male,40,AP\n", {}, r"m\.csv has no label columns"),
    ("Path,Edema\na,1.0\n", {"label_columns": []}, r"m\.csv has no label columns"),
    ("path,label\na,cat\nb,\nc,dog\n", {}, r"m\.csv, line 3: the class column 'label' is empty"),
    # groups
    ("path,label\na,x\n", {"group_column": "Patient ID"}, r"no column 'Patient ID' \(group_column\)"),
    ("path,patient,label\na,1,x\nb,,y\n", {"group_column": "patient"},
     r"m\.csv, line 3: the 'patient' cell \(group_column\) is empty"),
    # options
    ("path,label\na,x\n", {"uncertain": "u-ones"}, r"uncertain must be one of ignore, ones, zeros"),
    ("path,label\na,x\n", {"blank": "zero"}, r"blank must be one of negative, ignore"),
    ("path,label\na,x\n", {"label_columns": ["label"], "labels_column": "label"}, r"not both"),
])
def test_mistakes(tmp_path, text, options, match):
    csv_path = _write(tmp_path / "m.csv", text)
    with pytest.raises(UsageError, match=match):
        read_csv(csv_path, check_files=False, **options)


def test_missing_csv(tmp_path):
    with pytest.raises(UsageError, match=r"label file .*nope\.csv does not exist"):
        read_csv(tmp_path / "nope.csv")
    with pytest.raises(UsageError, match=r"is a folder"):
        read_csv(tmp_path)


def test_not_utf8(tmp_path):
    csv_path = tmp_path / "m.csv"
    csv_path.write_bytes(b"path,label\na.png,caf\xe9\n")
    with pytest.raises(UsageError, match=r"m\.csv is not UTF-8 text"):
        read_csv(csv_path, check_files=False)


def test_missing_images(tmp_path):
    _touch(tmp_path, "a.png", "c.png")
    csv_path = _write(tmp_path / "m.csv", "path,label\na.png,x\nb.png,y\nc.png,x\nd.png,y\n")
    with pytest.raises(UsageError, match=r"m\.csv, line 3: image b\.png not found .*2 of the 4 "
                                         r"images listed are missing.*the CSV's folder"):
        read_csv(csv_path)
    with pytest.raises(UsageError, match=r"line 2: image a\.png not found.*4 of the 4.*\(image_root\)"):
        read_csv(csv_path, image_root=tmp_path / "other")
    assert len(read_csv(csv_path, check_files=False)) == 4


def test_real_png_files(tmp_path):
    for name, v in (("a.png", 0), ("b.png", 255)):
        Image.new("L", (4, 4), v).save(tmp_path / name)
    t = read_csv(_write(tmp_path / "m.csv", "Image Index,Finding Labels\na.png,No Finding\nb.png,Mass\n"))
    assert t.names == ("Mass",)
    np.testing.assert_array_equal(t.targets, np.array([[0], [1]], dtype=np.float32))
    with Image.open(t.paths[1]) as im:
        assert im.getpixel((0, 0)) == 255
