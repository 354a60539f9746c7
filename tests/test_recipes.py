"""The paper's recipes as data (section 4.2 of the paper) and how they reach the optimizer."""

import pytest

from densenet.recipes import RECIPES, get_recipe, override
from densenet.train import learning_rate, make_config


def test_all_paper_recipes_exist():
    assert set(RECIPES) == {"c10", "c10+", "c100", "c100+", "svhn", "imagenet", "quickstart", "finetune",
                            "chexnet", "volume"}


def test_the_volume_recipe_is_monai_s_3d_tutorial():
    r = RECIPES["volume"]
    assert (r.model, r.dataset, r.batch_size, r.epochs, r.optimizer, r.lr) == \
        ("densenet121", "volumes", 2, 5, "adam", 1e-4)
    assert r.volume_shape() == (96, 96, 96) and r.intensity == "percentile"
    assert r.volume_augment() == {"flip_axes": (), "pad": 0, "rotate_plane": (0, 1)}
    assert r.milestone_epochs() == []  # a constant learning rate, as the tutorial's


@pytest.mark.parametrize("name", ["c10", "c10+", "c100", "c100+"])
def test_cifar_recipes_follow_section_4_2(name):
    r = get_recipe(name)
    assert (r.epochs, r.batch_size, r.lr, r.momentum, r.nesterov, r.weight_decay) == (300, 64, 0.1, 0.9, True, 1e-4)
    assert r.milestone_epochs() == [150, 225]
    assert r.val_size == 5000 and r.normalize == "meanstd"
    assert r.augment == name.endswith("+")
    assert r.drop_rate == (0.0 if r.augment else 0.2)  # dropout 0.2 only without augmentation


def test_svhn_recipe():
    r = get_recipe("svhn")
    assert (r.epochs, r.batch_size, r.normalize, r.drop_rate, r.val_size, r.selection) == (40, 64, "divide255", 0.2, 6000, "best")
    assert r.milestone_epochs() == [20, 30] and not r.augment and r.svhn_extra


def test_imagenet_recipe():
    r = get_recipe("imagenet")
    assert (r.epochs, r.batch_size, r.lr, r.weight_decay) == (90, 256, 0.1, 1e-4)
    assert r.milestone_epochs() == [30, 60] and r.input_size == 224


def test_learning_rate_divided_by_10_at_50_and_75_percent():
    r = get_recipe("c10+")
    assert learning_rate(r, 0) == 0.1
    assert learning_rate(r, 149) == 0.1
    assert learning_rate(r, 150) == pytest.approx(0.01)
    assert learning_rate(r, 224) == pytest.approx(0.01)
    assert learning_rate(r, 225) == pytest.approx(0.001)
    short = override(r, epochs=40)
    assert learning_rate(short, 19) == 0.1 and learning_rate(short, 20) == pytest.approx(0.01)
    assert learning_rate(short, 30) == pytest.approx(0.001)


def test_any_field_can_be_overridden_from_strings():
    cfg = make_config(recipe="c10", set_fields={"val_size": "0", "augment": "true", "lr_milestones": "0.3,0.6"},
                      epochs=10)
    assert cfg.recipe.val_size == 0 and cfg.recipe.augment is True
    assert cfg.recipe.lr_milestones == (0.3, 0.6) and cfg.recipe.milestone_epochs() == [3, 6]


@pytest.mark.parametrize("fields,word", [
    ({"epochs": "-1"}, "epochs"), ({"batch_size": "0"}, "batch_size"), ({"lr": "nan"}, "lr"),
    ({"augment": "maybe"}, "augment"), ({"colour": "red"}, "unknown recipe field"),
    ({"normalize": "zscore"}, "normalize"), ({"lr_milestones": "0.5,1.5"}, "lr_milestones"),
])
def test_bad_override_is_a_clear_error(fields, word):
    with pytest.raises(ValueError, match=word):
        make_config(recipe="c10", set_fields=fields)


def test_unknown_recipe_lists_known_ones():
    with pytest.raises(ValueError, match=r"unknown recipe 'c11'.*c10\+"):
        get_recipe("c11")
