"""Fixtures of the recipe tests: a tiny model directory and a generated CSV (tiny_task.py)."""
import pytest
from tiny_task import QUANT_WIDTH, save_tiny_model_dir, write_csv


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return save_tiny_model_dir(tmp_path_factory.mktemp("tiny-llama"))


@pytest.fixture(scope="module")
def quant_model_dir(tmp_path_factory):
    """A tiny model directory wide enough for bitsandbytes' CPU 4-bit kernels (tiny_task.QUANT_WIDTH)."""
    return save_tiny_model_dir(tmp_path_factory.mktemp("tiny-llama-64"), **QUANT_WIDTH)


@pytest.fixture(scope="module")
def csv_file(tmp_path_factory):
    return write_csv(tmp_path_factory.mktemp("data") / "reviews.csv")
