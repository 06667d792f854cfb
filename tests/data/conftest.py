"""Fixtures for the data tests."""
import pytest

from data_testing import make_image_root


@pytest.fixture
def image_root(tmp_path):
    return make_image_root(tmp_path / "imagenet")


@pytest.fixture
def run_dir(tmp_path):
    return str(tmp_path / "run")
