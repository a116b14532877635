"""Checkpoints named by Hub id resolve from a Hugging Face cache laid out as huggingface_hub lays it,
offline (HF_HUB_OFFLINE=1, HF_HOME a temporary directory): nothing is ever downloaded."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from huggingface_hub import constants
from typer.testing import CliRunner

from moe_serve.checkpoint import Checkpoint
from moe_serve.cli.main import app
from moe_serve.config import RouterSettings
from moe_serve.hub import (
    CheckpointNotFound,
    checkpoint_name,
    parse_hub_id,
    portable_reference,
    resolve_checkpoint,
)
from tests.helpers import lay_into_hub_cache, save_tiny_mixtral

REPO = "tiny-org/tiny-mixtral"
COMMIT = "0123456789abcdef0123456789abcdef01234567"


@pytest.fixture
def hf_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """HF_HOME=tmp and HF_HUB_OFFLINE=1; huggingface_hub reads both when imported (transformers imported
    it already in this process), so its constants are set to match."""
    home = tmp_path / "hf-home"
    monkeypatch.setenv("HF_HOME", str(home))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(constants, "HF_HOME", str(home))
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(home / "hub"))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    yield home


@pytest.fixture
def cached(hf_home: Path, tmp_path: Path) -> Path:
    """The tiny checkpoint as a cached snapshot of REPO at COMMIT (refs/main -> COMMIT)."""
    return lay_into_hub_cache(save_tiny_mixtral(tmp_path / "saved"), hf_home, REPO, COMMIT)


@pytest.mark.parametrize("reference", [REPO, f"{REPO}@main", f"{REPO}@{COMMIT}"])
def test_a_hub_id_resolves_to_its_cached_snapshot(cached: Path, reference: str) -> None:
    resolved = resolve_checkpoint(reference)
    assert resolved == cached
    assert Checkpoint(resolved).spec.num_experts == 8  # the weights read through the cache's symlinks


def test_the_snapshot_names_the_model_and_travels_as_the_pinned_id(cached: Path) -> None:
    assert checkpoint_name(cached) == "tiny-mixtral"
    assert Checkpoint(cached).name == "tiny-mixtral"
    assert portable_reference(cached) == f"{REPO}@{COMMIT}"
    assert resolve_checkpoint(portable_reference(cached)) == cached


def test_an_existing_directory_wins_over_a_hub_id(
    hf_home: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    local = save_tiny_mixtral(tmp_path / "tiny-org" / "tiny-mixtral")
    monkeypatch.chdir(tmp_path)
    assert resolve_checkpoint(REPO) == Path(REPO)
    assert portable_reference(local) == str(local)
    assert checkpoint_name(local) == "tiny-mixtral"


def test_settings_resolve_a_hub_id(cached: Path) -> None:
    assert RouterSettings(checkpoint=REPO).checkpoint == cached


@pytest.mark.parametrize("reference", ["./a/b", "/abs/dir", "a/b/c", "dir", "org/na--me", "../x"])
def test_paths_are_not_hub_ids(reference: str) -> None:
    assert parse_hub_id(reference) is None


def test_hub_id_and_revision_are_parsed() -> None:
    assert parse_hub_id("mistralai/Mixtral-8x7B-v0.1@refs/pr/3") == ("mistralai/Mixtral-8x7B-v0.1", "refs/pr/3")
    assert parse_hub_id("Qwen/Qwen1.5-MoE-A2.7B") == ("Qwen/Qwen1.5-MoE-A2.7B", None)


def test_nothing_cached_and_offline_is_one_actionable_line(hf_home: Path) -> None:
    with pytest.raises(CheckpointNotFound) as raised:
        resolve_checkpoint("tiny-org/not-there@v1")
    message = str(raised.value)
    assert "\n" not in message
    assert "tiny-org/not-there@v1" in message and "HF_HUB_OFFLINE" in message and "HF_HOME" in message


def test_the_cli_reports_a_missing_hub_checkpoint_with_exit_code_2(hf_home: Path) -> None:
    result = CliRunner().invoke(app, ["router", "--checkpoint", "tiny-org/not-there"])
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and "tiny-org/not-there" in lines[0], result.output
