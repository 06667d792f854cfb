"""load_checkpoint (the library API) on damaged files: every one is a one-line UserError naming the file, in
plain text (torch's own refusal spans lines, in terminal colours)."""
import pytest
import torch

from nas.errors import UserError
from nas.models import create_model, load_checkpoint


class NotATensor:
    pass


@pytest.mark.parametrize("case,message", [
    ("empty", "could not be read (the file is empty)"),
    ("truncated", "could not be read (damaged, truncated or not a checkpoint: RuntimeError)"),
    ("cut_pickle", "could not be read (damaged, truncated or not a checkpoint: "),
    ("foreign_object", "which we refuse to unpickle (Unsupported global: GLOBAL "),
])
def test_damaged_files_are_one_plain_line(tmp_path, case, message):
    model = create_model("local_vim_demo", img_size=16, num_classes=3)
    path = tmp_path / "model.pt"
    torch.save(model.state_dict(), path)
    data = path.read_bytes()
    if case == "empty":
        path.write_bytes(b"")
    elif case == "truncated":
        path.write_bytes(data[: len(data) // 2])
    elif case == "cut_pickle":
        torch.save(model.state_dict(), path, _use_new_zipfile_serialization=False)
        path.write_bytes(path.read_bytes()[:40])
    else:
        torch.save({"weights": model.state_dict(), "extra": NotATensor()}, path)
    with pytest.raises(UserError) as err:
        load_checkpoint(model, str(path))
    text = str(err.value)
    assert text.startswith(f"checkpoint: {str(path)!r} ") and message in text, text
    assert "\n" not in text and "\x1b" not in text
