"""Integrity: file digests, pinned model files and artifact manifests."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest

from inference.exceptions import ArtifactError
from inference.integrity import (
    MINILM,
    SMOLLM2,
    sha256_file,
    verify_file,
    verify_manifest,
    write_manifest,
)


@pytest.fixture
def artifact(tmp_path: Path) -> Path:
    folder = tmp_path / "artifact"
    (folder / "sub").mkdir(parents=True)
    (folder / "weights.bin").write_bytes(b"\x00\x01weights")
    (folder / "config.json").write_text('{"d": 8}', encoding="utf-8")
    (folder / "sub" / "vocab.txt").write_text("a\nb\n", encoding="utf-8")
    return folder


def test_sha256_file_matches_hashlib(tmp_path: Path) -> None:
    path = tmp_path / "f"
    data = bytes(range(256)) * 9000  # spans several read blocks
    path.write_bytes(data)
    assert sha256_file(path) == hashlib.sha256(data).hexdigest()


def test_verify_file_refuses_other_content(tmp_path: Path) -> None:
    path = tmp_path / "f"
    path.write_bytes(b"hello")
    verify_file(path, hashlib.sha256(b"hello").hexdigest())
    with pytest.raises(ArtifactError, match="integrity"):
        verify_file(path, hashlib.sha256(b"hellO").hexdigest())
    with pytest.raises(ArtifactError, match="missing"):
        verify_file(tmp_path / "absent", hashlib.sha256(b"").hexdigest())


def test_manifest_round_trip_carries_extra_fields(artifact: Path) -> None:
    path = write_manifest(artifact, {"model": "gen", "data_sha256": {"u.data": "ab"}})
    manifest = verify_manifest(artifact)
    assert path == artifact / "manifest.json"
    assert manifest["model"] == "gen"
    assert manifest["data_sha256"] == {"u.data": "ab"}
    assert set(manifest["files"]) == {"weights.bin", "config.json", "sub/vocab.txt"}
    assert manifest["files"]["weights.bin"] == sha256_file(artifact / "weights.bin")


def test_manifest_refuses_a_tampered_file(artifact: Path) -> None:
    write_manifest(artifact, {})
    (artifact / "sub" / "vocab.txt").write_text("a\nb\nc\n", encoding="utf-8")
    with pytest.raises(ArtifactError, match=r"sub/vocab\.txt"):
        verify_manifest(artifact)


def test_manifest_refuses_missing_and_unlisted_files(artifact: Path) -> None:
    write_manifest(artifact, {})
    (artifact / "weights.bin").unlink()
    with pytest.raises(ArtifactError, match=r"weights\.bin is missing"):
        verify_manifest(artifact)
    write_manifest(artifact, {})
    (artifact / "extra.py").write_text("print('hi')", encoding="utf-8")
    with pytest.raises(ArtifactError, match=r"extra\.py is not listed"):
        verify_manifest(artifact)


def test_manifest_refuses_paths_outside_the_folder(artifact: Path) -> None:
    write_manifest(artifact, {})
    manifest_path = artifact / "manifest.json"
    manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
    manifest["files"]["../outside"] = "0" * 64
    manifest_path.write_text(json.dumps(manifest), encoding="utf-8")
    with pytest.raises(ArtifactError, match="invalid entry"):
        verify_manifest(artifact)


def test_manifest_reserved_keys_and_absence(artifact: Path) -> None:
    with pytest.raises(ArtifactError, match="reserved"):
        write_manifest(artifact, {"files": {}})
    with pytest.raises(ArtifactError, match=r"no manifest\.json"):
        verify_manifest(artifact)


def test_packaged_model_files_match_their_pins() -> None:
    assert (MINILM.verified_folder() / "model.safetensors").is_file()
    assert (SMOLLM2.verified_folder() / "SmolLM2-135M-Instruct.Q4_1.gguf").is_file()
