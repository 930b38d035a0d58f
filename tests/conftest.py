"""Session-scoped real checkpoints shared by every test file (built once, in a temp dir, in ~2 s)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))  # `import fixtures` from any test file

import fixtures  # noqa: E402


@pytest.fixture(scope="session")
def family_models(tmp_path_factory) -> dict[str, "fixtures.FamilyCheckpoint"]:
    """{family: FamilyCheckpoint(path, transformers config, num_parameters)} for all nine families."""
    root = tmp_path_factory.mktemp("families")
    return {f: fixtures.make_family_checkpoint(f, root / f) for f in fixtures.FAMILIES}


@pytest.fixture(scope="session")
def family_checkpoints(family_models) -> dict[str, Path]:
    """{family: directory of a sharded safetensors save_pretrained checkpoint}."""
    return {f: m.path for f, m in family_models.items()}


@pytest.fixture(scope="session")
def llama_layouts(family_models, tmp_path_factory) -> dict[str, Path]:
    """One llama as: safetensors (dir), bin (dir), meta (dir), meta_vocab_parallel (dir), pt (file),
    single_file (model.safetensors), bf16 (dir)."""
    return fixtures.make_llama_layouts(family_models["llama"], tmp_path_factory.mktemp("llama_layouts"))
