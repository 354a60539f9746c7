"""The chexnet recipe (Rajpurkar et al. 2017): Adam, the learning rate cut by 10 when the
validation loss plateaus (the same cuts as torch's ReduceLROnPlateau, recomputed from the
metrics so a resume continues them), CheXNet's flip-only augmentation, weighted BCE."""

import numpy as np
import pytest
import torch
from PIL import Image

from densenet.errors import UsageError
from densenet.preprocess import Preprocess
from densenet.recipes import get_recipe, override
from densenet.rundir import load_checkpoint
from densenet.train import learning_rate, plateaus, train
from test_multilabel_train import make_shapes
from test_train import TINY, make_folder_data


@pytest.mark.parametrize("patience", [0, 1, 3])
def test_plateau_cuts_are_those_of_torchs_reduce_lr_on_plateau(patience):
    # improvements, stalls of several lengths, and 0.79995: not below 0.8 by torch's relative
    # threshold (1e-4), so a stall too
    losses = [1.0, 0.8, 0.8, 0.79995, 0.7, 0.71, 0.72, 0.73, 0.6, 0.6, 0.6, 0.6, 0.6, 0.5, 0.55,
              0.56, 0.57, 0.58, 0.59, 0.4]
    opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=1.0)
    sched = torch.optim.lr_scheduler.ReduceLROnPlateau(opt, factor=0.1, patience=patience)
    for e, loss in enumerate(losses):
        if opt.param_groups[0]["lr"] < 1e-7:  # torch stops cutting below eps = 1e-8
            break
        sched.step(loss)
        assert 0.1 ** plateaus(losses[:e + 1], patience) == pytest.approx(opt.param_groups[0]["lr"])
    assert plateaus(losses, patience) >= 2 - (patience == 3)


def test_the_plateau_rate_of_an_epoch_comes_from_the_epochs_before():
    r = override(get_recipe("chexnet"), plateau_patience=0)
    history = [{"val_loss": v} for v in (0.5, 0.4, 0.41, 0.3, 0.3)]
    assert [learning_rate(r, e, history) for e in range(6)] == pytest.approx(
        [1e-3, 1e-3, 1e-3, 1e-4, 1e-4, 1e-5])


def test_the_chexnet_recipe_says_what_the_paper_did():
    r = get_recipe("chexnet")
    assert (r.model, r.input_size, r.batch_size, r.lr, r.optimizer, r.schedule, r.lr_gamma,
            r.normalize, r.pos_weight, r.train_crop) == (
        "densenet121", 224, 16, 1e-3, "adam", "plateau", 0.1, "imagenet", "auto", "center")


def test_center_crop_training_is_the_evaluation_crop_flipped_or_not(tmp_path):
    img = Image.fromarray(np.random.default_rng(0).integers(0, 255, (300, 260, 3), dtype=np.uint8))
    pre = Preprocess.files(224, (0.5, 0.5, 0.5), (0.25, 0.25, 0.25))
    seen = pre.eval_transform()(img)
    got = [pre.train_transform("center")(img) for _ in range(8)]
    assert all(torch.equal(g, seen) or torch.equal(g, seen.flip(-1)) for g in got)
    assert any(torch.equal(g, seen.flip(-1)) for g in got) and any(torch.equal(g, seen) for g in got)


def test_chexnet_trains_a_multi_label_csv_with_adam(tmp_path):
    data = make_shapes(tmp_path / "train", 48, seed=4)
    result = train(TINY, "chexnet", str(data), str(tmp_path / "run"), epochs=2, quiet=True,
                   set_fields={"val_size": "16"})
    assert result["task"] == "multi-label" and result["best_val_auroc"] is not None
    ckpt = load_checkpoint(tmp_path / "run" / "last.pt")
    assert ckpt["optimizer"]["param_groups"][0]["betas"] == (0.9, 0.999)
    assert "amsgrad" in ckpt["optimizer"]["param_groups"][0]  # torch.optim.Adam's state
    assert "pos_weight (negatives / positives per label)" in (tmp_path / "run" / "train.log").read_text()


def test_the_plateau_schedule_needs_validation_data(tmp_path):
    root = make_folder_data(tmp_path / "images", per_class=4)
    with pytest.raises(UsageError, match="the plateau schedule cuts the learning rate"):
        train(TINY, "c10+", str(root), str(tmp_path / "run"), epochs=1, quiet=True,
              set_fields={"schedule": "plateau", "val_size": "0"})
    assert not (tmp_path / "run").exists()


def test_a_stopped_multi_label_chexnet_run_resumes_to_the_same_weights_and_thresholds(tmp_path):
    data = make_shapes(tmp_path / "d", 64, seed=0, uncertain_every=5)
    kw = dict(epochs=3, quiet=True, seed=0, set_fields={"val_size": "16"})
    train(TINY, "chexnet", str(data), str(tmp_path / "whole"), **kw)
    train(TINY, "chexnet", str(data), str(tmp_path / "stopped"), max_steps=4, **kw)  # mid-epoch 2
    train(resume=str(tmp_path / "stopped"))
    a, b = (load_checkpoint(tmp_path / r / "last.pt") for r in ("whole", "stopped"))
    assert all(torch.equal(a["state_dict"][k], b["state_dict"][k]) for k in a["state_dict"])
    assert a["thresholds"] == b["thresholds"]
    # validation and the schedule alike (the stopped epoch's training means cover only the
    # steps run after the resume)
    kept = ("epoch", "val_loss", "val_error", "val_auroc", "lr")
    assert [{k: r[k] for k in kept} for r in a["history"]] == [{k: r[k] for k in kept} for r in b["history"]]
