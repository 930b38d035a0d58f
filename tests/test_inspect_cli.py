"""`mmrec inspect`: a readable table, --json as one object, and `error: ...` + exit 1 on bad sources."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
import typer
from typer.testing import CliRunner

from mmrec.cli.inspect_cmd import inspect

REQUIRED = {"model_type", "vocab_size", "model_dim", "num_layers", "num_heads", "ffn_dim", "num_kv_heads",
            "head_dim", "tied_embeddings", "dtype", "num_parameters", "total_bytes", "files", "guessed"}
ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def app():
    app = typer.Typer()
    app.command()(inspect)
    return app


def test_json_output(app, family_models):
    m = family_models["gpt_neox"]
    result = CliRunner().invoke(app, [str(m.path), "--json"])
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert REQUIRED <= set(data)
    assert data["model_type"] == "gpt_neox" and data["vocab_size"] == 128 and data["ffn_dim"] == 160
    assert data["num_parameters"] == m.num_parameters and data["guessed"] == []


def test_table_output(app, llama_layouts):
    result = CliRunner().invoke(app, [str(llama_layouts["meta"])])
    assert result.exit_code == 0, result.output
    for text in ("llama", "meta", "consolidated.00.pth", "guessed from shapes", "106,816", "tokenizer.model"):
        assert text in result.stdout, text


def test_error_is_one_line_and_exit_1(app, tmp_path):
    (tmp_path / "model.safetensors").write_text("version https://git-lfs.github.com/spec/v1\n")
    result = CliRunner().invoke(app, [str(tmp_path)])
    assert result.exit_code == 1
    assert result.stdout == ""
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Git LFS pointer" in lines[0]


def _registered() -> bool:
    app_py = ROOT / "cli" / "app.py"
    return "inspect_cmd" in app_py.read_text() and (ROOT / ".venv" / "bin" / "mmrec").exists()


@pytest.mark.skipif(not _registered(), reason="`inspect` is not registered in cli/app.py yet")
def test_installed_command(family_checkpoints, tmp_path):
    exe = ROOT / ".venv" / "bin" / "mmrec"
    out = subprocess.run([str(exe), "inspect", str(family_checkpoints["gpt2"]), "--json"],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    data = json.loads(out.stdout)
    assert REQUIRED <= set(data) and data["model_type"] == "gpt2"
    bad = subprocess.run([str(exe), "inspect", str(tmp_path)], capture_output=True, text=True, timeout=120)
    assert bad.returncode == 1 and bad.stderr.startswith("error: ") and "no weights found" in bad.stderr
