"""Session fixtures shared by test modules: ``tiny_corpus`` (manifest folder) and ``tiny_model`` (trained
output_folder). Both skip when festival is not installed. See tests/utils.py."""
from __future__ import annotations

import pytest

from tests.utils import build_tiny_corpus, have_festival, train_aligner, train_tiny


@pytest.fixture(scope="session")
def tiny_corpus(tmp_path_factory):
    if not have_festival():
        pytest.skip("festival not installed")
    return build_tiny_corpus(tmp_path_factory.mktemp("tiny_corpus"))


@pytest.fixture(scope="session")
def tiny_model(tiny_corpus, tmp_path_factory):
    return train_tiny(tiny_corpus, tmp_path_factory.mktemp("tiny_model") / "run")


@pytest.fixture(scope="session")
def aligner_model(tiny_corpus, tmp_path_factory):
    return train_aligner(tiny_corpus, tmp_path_factory.mktemp("aligner_model") / "run")
