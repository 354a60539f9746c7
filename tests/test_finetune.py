"""Fine-tuning: ``densenet train --weights FILE`` (torchvision, timm, our checkpoints and run
directories), the classifier kept or replaced, ``--freeze features``, the finetune recipe
(cosine schedule, label smoothing, discriminative learning rates, a fractional hold-out) and
small images upscaled for an ImageNet-stem model."""

import dataclasses
import json
import math
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from densenet import data as data_mod
from densenet.errors import UsageError
from densenet.inference import evaluate, load_for_inference, predict
from densenet.model import create_model
from densenet.recipes import get_recipe
from densenet.rundir import load_checkpoint
from densenet.train import learning_rate, train

from test_train import TINY, make_folder_data


def _source_weights(num_classes: int, seed: int = 0) -> dict:
    """A torchvision-format state dict of TINY with non-default BN statistics and weights."""
    torch.manual_seed(seed)
    net = create_model(TINY, num_classes=num_classes)
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.uniform_(-0.1, 0.1)
                m.running_var.uniform_(0.5, 1.5)
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.1, 0.1)
        net.classifier.bias.uniform_(-0.5, 0.5)
    return net.state_dict()


def _finetune(tmp_path, data, name, weights, **kw):
    kw.setdefault("epochs", 1)
    kw.setdefault("batch_size", 24)
    set_fields = {"val_size": "0", "augment": "false", **kw.pop("set_fields", {})}
    return train(kw.pop("model", TINY), "finetune", str(data), str(tmp_path / name),
                 weights=str(weights), quiet=True, seed=0, set_fields=set_fields, **kw)


def _first_loss_by_hand(state: dict, data, num_classes: int) -> float:
    """Cross-entropy (label smoothing 0.1) of one training step on the whole folder, from a
    model loaded by hand: batch statistics, ImageNet normalisation."""
    ds = data_mod.open_dataset(data)
    mean = torch.tensor(data_mod.IMAGENET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(data_mod.IMAGENET_STD).view(1, 3, 1, 1)
    x = (ds.train.images.float() / 255 - mean) / std
    net = create_model(TINY, num_classes=num_classes)
    net.load_state_dict(state)
    net.train()
    return F.cross_entropy(net(x), ds.train.labels, label_smoothing=0.1).item()


def _train_loss(run_dir) -> float:
    return json.loads((run_dir / "metrics.jsonl").read_text().splitlines()[0])["train_loss"]


def test_torchvision_weights_are_where_training_starts(tmp_path):
    data = make_folder_data(tmp_path / "data", per_class=8)
    state = _source_weights(3)
    torch.save(state, tmp_path / "tv.pth")
    _finetune(tmp_path, data, "run", tmp_path / "tv.pth")
    run = tmp_path / "run"
    assert _train_loss(run) == pytest.approx(_first_loss_by_hand(state, data, 3), rel=1e-5)
    assert "kept the classifier" in (run / "train.log").read_text()
    ckpt = load_checkpoint(run / "last.pt")
    assert ckpt["state_dict"]["classifier.weight"].shape[0] == 3
    assert ckpt["pretrained"] == {"weights": str(tmp_path / "tv.pth"), "new_head": False}


def test_new_head_replaces_a_classifier_whose_count_fits(tmp_path):
    data = make_folder_data(tmp_path / "data", per_class=8)
    state = _source_weights(3)  # three classes, but not necessarily the data's three
    torch.save(state, tmp_path / "tv.pth")
    _finetune(tmp_path, data, "run", tmp_path / "tv.pth", new_head=True, freeze="features")
    run = tmp_path / "run"
    assert "new classifier for the data's 3 classes (--new-head)" in (run / "train.log").read_text()
    ckpt = load_checkpoint(run / "last.pt")
    assert ckpt["pretrained"]["new_head"] is True
    assert not torch.equal(ckpt["state_dict"]["classifier.bias"], state["classifier.bias"])
    assert torch.equal(ckpt["state_dict"]["features.conv0.weight"], state["features.conv0.weight"])
    with pytest.raises(UsageError, match="--new-head replaces the classifier of pretrained weights"):
        train(TINY, "finetune", str(data), str(tmp_path / "r2"), new_head=True, quiet=True)


def test_a_timm_checkpoint_loads_the_same_way(tmp_path):
    data = make_folder_data(tmp_path / "data", per_class=8)
    state = _source_weights(3, seed=1)
    # timm's train.py writes the weights under state_dict (DDP-prefixed when trained so)
    torch.save({"epoch": 7, "arch": TINY, "state_dict": {f"module.{k}": v for k, v in state.items()},
                "version": 2}, tmp_path / "timm.pth.tar")
    _finetune(tmp_path, data, "run", tmp_path / "timm.pth.tar")
    assert _train_loss(tmp_path / "run") == pytest.approx(_first_loss_by_hand(state, data, 3), rel=1e-5)


def test_freeze_features_trains_the_new_head_only(tmp_path):
    data = make_folder_data(tmp_path / "data", per_class=8)
    state = _source_weights(5)  # five classes in the file, three in the data: a new head
    torch.save(state, tmp_path / "tv.pth")
    _finetune(tmp_path, data, "run", tmp_path / "tv.pth", freeze="features", epochs=2,
              batch_size=8, lr=0.5)
    run = tmp_path / "run"
    after = load_checkpoint(run / "last.pt")["state_dict"]
    features = [k for k in state if k.startswith("features.")]
    assert features and all(torch.equal(after[k], state[k]) for k in features)  # buffers too
    assert after["classifier.weight"].shape == (3, state["classifier.weight"].shape[1])
    log = (run / "train.log").read_text()
    assert "new classifier for the data's 3 classes (the file has 5 classes, the data 3)" in log
    assert "features frozen" in log
    groups = load_checkpoint(run / "last.pt")["optimizer"]["param_groups"]
    assert len(groups) == 1 and len(groups[0]["params"]) == 2  # classifier weight and bias


def test_the_pretrained_part_learns_at_a_lower_rate_than_a_new_head(tmp_path):
    data = make_folder_data(tmp_path / "data", per_class=8)
    torch.save(_source_weights(5), tmp_path / "tv.pth")
    _finetune(tmp_path, data, "run", tmp_path / "tv.pth", epochs=2, batch_size=12,
              set_fields={"pretrained_lr_scale": "0.1"})
    groups = load_checkpoint(tmp_path / "run" / "last.pt")["optimizer"]["param_groups"]
    r = dataclasses.replace(get_recipe("finetune"), epochs=2, pretrained_lr_scale=0.1)
    lr = learning_rate(r, 1)  # the second epoch's: half-way down the cosine
    assert lr == pytest.approx(0.03 * 0.5 * (1 + math.cos(math.pi / 2)))
    assert [g["lr"] for g in groups] == pytest.approx([lr * r.pretrained_lr_scale, lr])


def test_a_run_directory_as_weights_names_model_and_classes(tmp_path):
    first = make_folder_data(tmp_path / "a", classes=("cat", "dog", "frog"), per_class=8)
    train(TINY, "c10+", str(first), str(tmp_path / "src"), epochs=1, batch_size=8, quiet=True,
          set_fields={"val_size": "0"})
    # other classes, same count: the head is replaced (names differ); the model comes from it
    other = make_folder_data(tmp_path / "b", classes=("ant", "bee", "cow"), per_class=8)
    result = train(None, "finetune", str(other), str(tmp_path / "ft"), weights=str(tmp_path / "src"),
                   epochs=1, batch_size=24, quiet=True, set_fields={"val_size": "0"})
    assert result["model"] == TINY
    assert "the file's 3 classes are not the data's" in (tmp_path / "ft" / "train.log").read_text()
    # the same classes: kept
    train(None, "finetune", str(first), str(tmp_path / "ft2"), weights=str(tmp_path / "src" / "last.pt"),
          epochs=1, batch_size=24, quiet=True, set_fields={"val_size": "0"})
    assert "kept the classifier" in (tmp_path / "ft2" / "train.log").read_text()


def test_same_class_names_in_another_order_reorder_the_head():
    from densenet.weights import load_pretrained
    state = _source_weights(3)
    ckpt = {"model": {"name": TINY, "overrides": {"num_classes": 3}}, "state_dict": state,
            "classes": ["cat", "dog", "frog"]}
    path = "/tmp/_reorder_test.pt"
    torch.save(ckpt, path)
    try:
        net = create_model(TINY, num_classes=3)
        new_head, line = load_pretrained(net, path, ["frog", "cat", "dog"])
    finally:
        import os
        os.remove(path)
    assert not new_head and "data's order" in line
    assert torch.equal(net.classifier.weight[0], state["classifier.weight"][2])
    assert torch.equal(net.classifier.bias[1], state["classifier.bias"][0])


def test_fractional_holdout_when_there_is_no_val_folder(tmp_path):
    data = make_folder_data(tmp_path / "data", per_class=10)
    torch.save(_source_weights(3), tmp_path / "tv.pth")
    _finetune(tmp_path, data, "run", tmp_path / "tv.pth", set_fields={"val_size": "0.1"})
    split = json.loads((tmp_path / "run" / "split.json").read_text())
    assert split["val_size"] == 3 and len(split["val_indices"]) == 3  # 10% of 30
    row = json.loads((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()[0])
    assert row["val_error"] is not None


def test_resume_of_a_finetune_run_needs_no_weights_file(tmp_path):
    data = make_folder_data(tmp_path / "data", per_class=8)
    torch.save(_source_weights(5), tmp_path / "tv.pth")
    full = _finetune(tmp_path, data, "full", tmp_path / "tv.pth", epochs=2, batch_size=8)
    _finetune(tmp_path, data, "part", tmp_path / "tv.pth", epochs=2, batch_size=8, max_steps=4)
    (tmp_path / "tv.pth").unlink()
    resumed = train(resume=str(tmp_path / "part"), quiet=True)
    assert resumed["complete"] and full["complete"]
    a = load_checkpoint(tmp_path / "full" / "last.pt")["state_dict"]
    b = load_checkpoint(tmp_path / "part" / "last.pt")["state_dict"]
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_small_images_are_upscaled_for_an_imagenet_model(tmp_path):
    import torchvision
    data = make_folder_data(tmp_path / "data", per_class=4)
    torch.save(torchvision.models.densenet121(weights=None).state_dict(), tmp_path / "tv121.pth")
    _finetune(tmp_path, data, "run", tmp_path / "tv121.pth", model="densenet121", batch_size=12,
              set_fields={"input_size": "64"})
    run = tmp_path / "run"
    assert "32-pixel images upscaled to 64 for densenet121" in (run / "train.log").read_text()
    ckpt = load_checkpoint(run / "last.pt")
    assert ckpt["preprocess"]["input_size"] == 64 and ckpt["preprocess"]["image_size"] == 32
    assert ckpt["state_dict"]["classifier.weight"].shape[0] == 3
    loaded = load_for_inference(str(run))
    r = evaluate(loaded, str(data))
    assert r["n"] == 12 and r["single_crop"]["top1_error"] is not None
    image = next((data / "cat").iterdir())
    assert len(predict(loaded, [image], topk=2)[0]["top"]) == 2
    # prediction preprocesses a file exactly as training fed it: native size, then upscaled
    from densenet.inference import image_transform, open_image
    x = image_transform(loaded.preprocess)(open_image(image))
    assert x.shape == (3, 64, 64)
    # export takes the upscaled input size from the checkpoint
    from densenet.export import export
    report = export(loaded, "torchscript", tmp_path / "model.pt")
    assert report["ok"] and (tmp_path / "model.pt").stat().st_size > 0


def test_learning_rate_schedules():
    r = get_recipe("finetune")
    assert r.schedule == "cosine"
    assert [learning_rate(r, e) for e in (0, 10)] == pytest.approx([0.03, 0.015])
    assert learning_rate(get_recipe("c10"), 150) == pytest.approx(0.01)  # step schedule unchanged


def test_mistakes_are_clear_errors(tmp_path):
    data = make_folder_data(tmp_path / "data", per_class=4)
    with pytest.raises(UsageError, match="--freeze features keeps pretrained weights fixed; give them with --weights"):
        train(TINY, "finetune", str(data), str(tmp_path / "r1"), freeze="features", quiet=True)
    import torchvision
    torch.save(torchvision.models.densenet121(weights=None).state_dict(), tmp_path / "tv121.pth")
    with pytest.raises(UsageError, match="do not fit this model .*Check that --model names the architecture"):
        _finetune(tmp_path, data, "r2", tmp_path / "tv121.pth")
    with pytest.raises(UsageError, match="does not exist"):
        _finetune(tmp_path, data, "r3", tmp_path / "nowhere.pth")
    assert not (tmp_path / "r3").exists()  # checked before the run directory is made
    with pytest.raises(UsageError, match="recipe field optimizer must be sgd, adamw or adam"):
        _finetune(tmp_path, data, "r4", tmp_path / "tv121.pth", set_fields={"optimizer": "rmsprop"})
    with pytest.raises(UsageError, match="val_size must be a count or a fraction below 1"):
        _finetune(tmp_path, data, "r5", tmp_path / "tv121.pth", set_fields={"val_size": "1.5"})


def test_cli_weights_cannot_change_on_resume(tmp_path):
    p = subprocess.run([sys.executable, "-m", "densenet", "train", "--resume", str(tmp_path),
                        "--weights", "x.pth"], capture_output=True, text=True, timeout=120)
    assert p.returncode == 2
    assert "--weights cannot change on --resume" in p.stderr and "Traceback" not in p.stderr


def test_adamw_is_an_option(tmp_path):
    data = make_folder_data(tmp_path / "data", per_class=4)
    torch.save(_source_weights(3), tmp_path / "tv.pth")
    _finetune(tmp_path, data, "run", tmp_path / "tv.pth", set_fields={"optimizer": "adamw"})
    groups = load_checkpoint(tmp_path / "run" / "last.pt")["optimizer"]["param_groups"]
    assert "betas" in groups[0] and groups[0]["lr"] == pytest.approx(0.03)
