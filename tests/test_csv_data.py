"""CSV manifests as ``--data``: a path column and a class column train, evaluate and hold out by
group like a class folder does; what training does not read yet is refused clearly."""

import csv
import json

import pytest
import torch

from densenet import data as data_mod
from densenet.errors import UsageError
from densenet.inference import evaluate, load_for_inference
from densenet.train import train
from test_train import TINY, make_folder_data


def write_csv(path, header, rows):
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(header)
        w.writerows(rows)
    return path


@pytest.fixture
def manifest(tmp_path):
    """The colour-coded PNGs of make_folder_data listed in a CSV with relative paths, a class
    column and a patient column (3 images per patient)."""
    root = make_folder_data(tmp_path / "images", per_class=12)
    rows = []
    for c in ("cat", "dog", "frog"):
        for i in range(12):
            rows.append([f"images/{c}/{i:03d}.png", c, f"{c}-{i // 3}"])
    return write_csv(tmp_path / "labels.csv", ["path", "finding", "patient"], rows), root


def test_a_single_label_csv_opens_like_the_folder_it_lists(manifest, tmp_path):
    csv_path, root = manifest
    options = {"group_column": "patient"}
    ds = data_mod.open_dataset(csv_path, cache_dir=tmp_path / "cache", csv_options=options)
    folder = data_mod.open_dataset(root, cache_dir=tmp_path / "cache")
    assert ds.name == "csv" and ds.classes == folder.classes == ["cat", "dog", "frog"]
    assert ds.train.images.equal(folder.train.images) and ds.train.labels.equal(folder.train.labels)
    assert ds.val is None and ds.test is None
    assert ds.groups == [f"{c}-{i // 3}" for c in ("cat", "dog", "frog") for i in range(12)]
    again = data_mod.open_dataset(csv_path, cache_dir=tmp_path / "cache", csv_options=options)
    assert again.train.images.equal(ds.train.images) and again.groups == ds.groups  # the cache
    with pytest.raises(UsageError, match="line 2, column 'finding': 'cat' is not a label value"):
        data_mod.open_dataset(csv_path, cache_dir=tmp_path / "cache")  # patient read as a label


def test_training_on_a_csv_holds_out_whole_groups_and_records_them(manifest, tmp_path):
    csv_path, _ = manifest
    result = train(TINY, "c10+", str(csv_path), str(tmp_path / "run"), epochs=1, batch_size=8,
                   quiet=True, seed=0, set_fields={"val_size": "7", "group_column": "patient"})
    split = json.loads((tmp_path / "run" / "split.json").read_text())
    assert split["group_column"] == "patient"
    val = set(split["val_indices"])
    patients = [f"{c}-{i // 3}" for c in ("cat", "dog", "frog") for i in range(12)]
    held = {patients[i] for i in val}
    assert sorted(held) == split["val_groups"]
    assert not held & {patients[i] for i in range(36) if i not in val}  # no patient on both sides
    assert len(val) == split["val_size"] >= 7 and len(val) % 3 == 0  # whole patients of 3 images
    assert result["dataset"] == "csv"
    loaded = load_for_inference(str(tmp_path / "run"))
    assert loaded.classes == ["cat", "dog", "frog"]
    assert loaded.csv_options["group_column"] == "patient"  # eval reads the CSV as training did
    out = evaluate(loaded, str(csv_path))
    assert out["dataset"] == "csv" and out["n"] == 36


def test_a_group_column_without_a_csv_is_refused(tmp_path):
    root = make_folder_data(tmp_path / "images", per_class=4)
    with pytest.raises(UsageError, match="group_column 'patient' names a column of a CSV manifest"):
        train(TINY, "c10+", str(root), str(tmp_path / "run"), epochs=1, quiet=True,
              set_fields={"group_column": "patient"})
    assert not (tmp_path / "run").exists()


def test_a_multi_label_csv_opens_as_label_rows_with_nan_where_not_counted(tmp_path):
    make_folder_data(tmp_path / "images", per_class=3)
    rows = [["images/cat/000.png", 1, 0], ["images/cat/001.png", -1, 1], ["images/cat/002.png", "", 1]]
    csv_path = write_csv(tmp_path / "labels.csv", ["Path", "Effusion", "Edema"], rows)
    ds = data_mod.open_dataset(csv_path, cache_dir=tmp_path / "cache")
    assert ds.multi_label and ds.classes == ["Effusion", "Edema"]
    nan = float("nan")
    expected = torch.tensor([[1.0, 0.0], [nan, 1.0], [0.0, 1.0]])  # -1 ignored, blank negative
    assert torch.equal(ds.train.labels.isnan(), expected.isnan())
    assert torch.equal(torch.nan_to_num(ds.train.labels), torch.nan_to_num(expected))
    ones = data_mod.open_dataset(csv_path, cache_dir=tmp_path / "cache",
                                 csv_options={"uncertain": "ones", "blank": "ignore"})
    assert torch.equal(ones.train.labels.isnan(), torch.tensor([[False, False], [False, False], [True, False]]))
    assert ones.train.labels[1, 0] == 1


def test_the_csv_fields_are_checked_like_every_recipe_field(manifest, tmp_path):
    csv_path, _ = manifest
    with pytest.raises(UsageError, match="recipe field uncertain must be ignore, ones or zeros"):
        train(TINY, "c10+", str(csv_path), str(tmp_path / "run"), epochs=1, quiet=True,
              set_fields={"uncertain": "maybe"})


def test_label_columns_picks_the_class_column_from_the_command_line(manifest, tmp_path):
    csv_path, _ = manifest
    train(TINY, "c10+", str(csv_path), str(tmp_path / "run"), epochs=1, batch_size=8, quiet=True,
          set_fields={"val_size": "0", "label_columns": "finding"})
    loaded = load_for_inference(str(tmp_path / "run"))
    assert loaded.classes == ["cat", "dog", "frog"] and loaded.csv_options["label_columns"] == ["finding"]
    assert evaluate(loaded, str(csv_path))["n"] == 36


def test_image_root_from_the_command_line_for_train_and_eval(tmp_path, capsys):
    from densenet.cli import main
    make_folder_data(tmp_path / "elsewhere" / "images", per_class=4)
    rows = [[f"images/{c}/{i:03d}.png", c] for c in ("cat", "dog", "frog") for i in range(4)]
    (tmp_path / "lists").mkdir()
    csv_path = write_csv(tmp_path / "lists" / "labels.csv", ["path", "finding"], rows)
    with pytest.raises(UsageError, match="1 of the 12 images listed are missing|12 of the 12 images"):
        data_mod.open_dataset(csv_path, cache_dir=tmp_path / "cache")
    run = tmp_path / "run"
    assert main(["train", "--model", TINY, "--recipe", "c10+", "--data", str(csv_path), "--epochs", "1",
                 "--set", "val_size=0", "--image-root", str(tmp_path / "elsewhere"), "--quiet",
                 "--out", str(run)]) == 0
    assert json.loads((run / "config.json").read_text())["image_root"] == str(tmp_path / "elsewhere")
    capsys.readouterr()  # the run's log
    assert main(["eval", str(run), "--data", str(csv_path), "--json"]) == 0  # training's root
    assert json.loads(capsys.readouterr().out)["n"] == 12
    other = tmp_path / "copy"
    make_folder_data(other / "images", per_class=4)
    assert main(["eval", str(run), "--data", str(csv_path), "--image-root", str(other), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["n"] == 12
    assert main(["train", "--resume", str(run), "--image-root", str(other)]) == 2
    assert "--image-root cannot change on --resume" in capsys.readouterr().err
