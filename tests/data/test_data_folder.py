"""ImageFolder and file-list (meta file) datasets built from real image files."""
import os

import torch

from nas.data import build_datasets, read_file_list
from data_testing import CLASSES, TRAIN_PER_CLASS, VAL_PER_CLASS


def test_image_folder_classes_labels_and_items(image_root):
    bundle = build_datasets({"path": image_root}, img_size=16)
    assert bundle.class_names == sorted(CLASSES)
    assert bundle.num_classes == 3 and bundle.heldout is None
    assert len(bundle.train) == 3 * TRAIN_PER_CLASS and len(bundle.val) == 3 * VAL_PER_CLASS
    for dataset in (bundle.train, bundle.val):
        for image_id, label in zip(dataset.samples.ids, dataset.labels):
            assert os.path.basename(os.path.dirname(image_id)) == bundle.class_names[label]
        x, y = dataset[len(dataset) - 1]
        assert x.shape == (3, 16, 16) and x.dtype == torch.float32 and y == 2


def test_extensions_are_case_insensitive_and_other_files_ignored(image_root):
    ids = build_datasets({"path": image_root}, img_size=8).train.samples.ids
    extensions = {os.path.splitext(i)[1] for i in ids}
    assert extensions == {".JPEG", ".jpg", ".png", ".JPG", ".bmp", ".webp"}
    assert not any(i.endswith(".txt") for i in ids)


def _write_meta(path, lines):
    with open(path, "w") as f:
        f.write("# a comment, then a blank line\n\n" + "".join(f"{p} {label}\n" for p, label in lines))


def test_meta_files_relative_paths_match_the_folder(image_root):
    folder = build_datasets({"path": image_root}, img_size=8)
    meta = os.path.join(image_root, "meta")
    os.makedirs(meta)
    for split, dataset in (("train", folder.train), ("val", folder.val)):
        _write_meta(os.path.join(meta, f"{split}.txt"),
                    [(os.path.relpath(i, meta), label) for i, label in zip(dataset.samples.ids, dataset.labels)])
    bundle = build_datasets({"path": os.path.join(meta, "train.txt")}, img_size=8)  # val.txt found beside it
    assert bundle.class_names == folder.class_names  # names from the images' parent folders
    assert [os.path.normpath(i) for i in bundle.train.samples.ids] == folder.train.samples.ids
    assert bundle.train.labels.tolist() == folder.train.labels.tolist()
    assert len(bundle.val) == len(folder.val)
    assert torch.equal(bundle.val[3][0], folder.val[3][0])


def test_meta_file_absolute_paths_spaces_and_label_names(tmp_path):
    from data_testing import write_image
    folder = tmp_path / "my images"
    folder.mkdir()
    lines = []
    for k in range(4):
        path = folder / f"img {k}.png"
        write_image(path, k)
        lines.append((str(path), k % 2))
    _write_meta(tmp_path / "list.txt", lines)
    samples = read_file_list(str(tmp_path / "list.txt"))
    assert samples.ids == [str(p) for p, _ in lines] and samples.labels.tolist() == [0, 1, 0, 1]
    assert samples.class_names == ["0", "1"]  # one folder for both labels: names are the label numbers
    (tmp_path / "classes.txt").write_text("cat\ndog\n")
    assert read_file_list(str(tmp_path / "list.txt")).class_names == ["cat", "dog"]
    bundle = build_datasets({"path": str(tmp_path / "list.txt"), "val_path": str(tmp_path / "list.txt")}, 12)
    assert bundle.class_names == ["cat", "dog"] and bundle.train[1][0].shape == (3, 12, 12)


def test_val_folder_uses_the_train_mapping(image_root, tmp_path):
    # val given as a separate folder of class folders, with an extra class absent from train: ignored
    val = tmp_path / "other_val"
    from data_testing import write_image
    for name in CLASSES + ["n99999999"]:
        (val / name).mkdir(parents=True)
        write_image(val / name / "a.jpg", 1)
    bundle = build_datasets({"path": image_root, "val_path": str(val)}, img_size=8)
    assert len(bundle.val) == 3
    assert [bundle.class_names[y] for y in bundle.val.labels] == sorted(CLASSES)
