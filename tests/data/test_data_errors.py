"""Bad data and bad settings: a one-line DataError naming the path or value, raised while building."""
import os
import re
import shutil

import pytest

from nas.data import DataError, build_datasets, build_loader
from data_testing import write_image


def _error(cfg, img_size=8, **kwargs) -> str:
    with pytest.raises(DataError) as info:
        build_datasets(cfg, img_size, **kwargs)
    message = str(info.value)
    assert "\n" not in message and isinstance(info.value, ValueError)
    return message


def test_missing_path(tmp_path):
    missing = str(tmp_path / "nowhere")
    assert missing in _error({"path": missing}) and "does not exist" in _error({"path": missing})


def test_folder_without_train_or_val(image_root):
    shutil.rmtree(os.path.join(image_root, "val"))
    assert "has no val/ folder" in _error({"path": image_root})
    shutil.rmtree(os.path.join(image_root, "train"))
    assert f"{image_root} has no train/ folder" in _error({"path": image_root})


def test_empty_and_class_less_folders(tmp_path):
    (tmp_path / "empty" / "train").mkdir(parents=True)
    message = _error({"path": str(tmp_path / "empty")})
    assert "train has no class folders" in message
    loose = tmp_path / "loose" / "train"
    loose.mkdir(parents=True)
    write_image(loose / "a.JPEG", 0)
    assert "lie loose" in _error({"path": str(tmp_path / "loose")})


def test_class_folder_without_images(image_root):
    folder = os.path.join(image_root, "train", "n00000002")
    for name in os.listdir(folder):
        if not name.endswith(".txt"):
            os.remove(os.path.join(folder, name))
    with pytest.raises(DataError, match=f"class folder {folder} has no images"):
        build_datasets({"path": image_root}, 8)


def test_val_lacks_a_class(image_root):
    shutil.rmtree(os.path.join(image_root, "val", "n00000003"))
    with pytest.raises(DataError, match="no folder for class 'n00000003'"):
        build_datasets({"path": image_root}, 8)


def test_class_list_names_absent_classes(image_root, tmp_path):
    with pytest.raises(DataError, match=r"names 2 class\(es\) absent from .*train: n1, n2"):
        build_datasets({"path": image_root, "classes": ["n00000001", "n1", "n2"]}, 8)
    with pytest.raises(DataError, match="class list imagenet100 names 100 class"):
        build_datasets({"path": image_root, "classes": "imagenet100"}, 8)
    with pytest.raises(DataError, match="'imagenet1k' is neither a class list file nor a shipped list"):
        build_datasets({"path": image_root, "classes": "imagenet1k"}, 8)
    (tmp_path / "empty.txt").write_text("# nothing\n")
    with pytest.raises(DataError, match="names no classes"):
        build_datasets({"path": image_root, "classes": str(tmp_path / "empty.txt")}, 8)


def test_subset_larger_than_the_data(image_root):
    with pytest.raises(DataError, match="data.num_classes=5 but .* has only 3 classes"):
        build_datasets({"path": image_root, "num_classes": 5}, 8)
    with pytest.raises(DataError, match="data.images_per_class=7 but class 'n00000001' .* has only 6 images"):
        build_datasets({"path": image_root, "images_per_class": 7}, 8)
    with pytest.raises(DataError, match="data.num_classes=11 but the demo data has only 10 classes"):
        build_datasets({"path": "demo", "num_classes": 11}, 8)
    with pytest.raises(DataError, match="needs at least 2 per class"):
        build_datasets({"path": image_root, "images_per_class": 1, "heldout_fraction": 0.5}, 8)


def test_unknown_keys_and_bad_values():
    message = _error({"path": "demo", "num_class": 3, "colour": 1})
    assert message.startswith("unknown data key(s) 'colour', 'num_class'; valid keys: path, val_path,")
    assert "num_classes" in message and "heldout_fraction" in message
    for key, value, expected in [("num_classes", 0, "a positive int"), ("images_per_class", 2.5, "a positive int"),
                                 ("fraction", 1.5, r"a number in \(0, 1\]"),
                                 ("heldout_fraction", 1, r"a number in \[0, 1\)"),
                                 ("class_sampling", "best", "one of first, random"), ("seed", "x", "an int"),
                                 ("scale", [0.5, 0.1], r"\[min, max\]"),
                                 ("interpolation", "nearest", "one of bicubic, bilinear"),
                                 ("num_classes", True, "a positive int")]:
        with pytest.raises(DataError, match=f"data.{key}: expected {expected}.*got {re.escape(repr(value))}"):
            build_datasets({"path": "demo", key: value}, 8)
    with pytest.raises(DataError, match="both set"):
        build_datasets({"images_per_class": 3, "fraction": 0.5}, 8)
    with pytest.raises(DataError, match="img_size: expected a positive int"):
        build_datasets({}, 0)
    with pytest.raises(DataError, match="val_path does not apply to the demo data"):
        build_datasets({"val_path": "x"}, 8)


def test_bad_file_lists(tmp_path, image_root):
    train = tmp_path / "train.txt"
    train.write_text("")
    assert f"file list {train} lists no images" in _error({"path": str(train)})
    train.write_text("a.jpg 0\nb.jpg cat\n")
    assert f"{train} line 2: expected 'path label'" in _error({"path": str(train)})
    train.write_text("a.jpg 0\nb.jpg 1\n")
    message = _error({"path": str(train)})
    assert f"images listed in {train} exist (e.g. {tmp_path / 'a.jpg'})" in message
    write_image(tmp_path / "a.jpg", 0)
    write_image(tmp_path / "b.jpg", 1)
    assert f"no val list found for {train} (looked for {tmp_path / 'val.txt'}); set data.val_path" in \
        _error({"path": str(train)})
    (tmp_path / "val.txt").write_text("a.jpg 0\nb.jpg 2\n")
    assert "label 2 is out of range for the 2 training classes" in _error({"path": str(train)})
    train.write_text("a.jpg 0\nb.jpg 2\n")
    assert "label 1 has no images" in _error({"path": str(train)})
    assert f"val path {tmp_path / 'gone'} does not exist" in _error({"path": image_root,
                                                                     "val_path": str(tmp_path / "gone")})
    assert "is not a file" in _error({"path": image_root, "heldout_path": str(tmp_path / "gone")})


def test_batch_larger_than_the_training_set(image_root):
    bundle = build_datasets({"path": image_root}, 8)
    with pytest.raises(DataError, match="batch_size=32 is larger than the 18 training images per process"):
        build_loader(bundle.train, 32, train=True)
    assert len(build_loader(bundle.val, 32, train=False)) == 1  # eval keeps the partial batch
