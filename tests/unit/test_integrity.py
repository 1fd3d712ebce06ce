"""Integrity: file digests, pinned model files, signed artifact manifests and their keys."""

from __future__ import annotations

import base64
import hashlib
import json
import logging
import os
import stat
from pathlib import Path

import pytest
from click.testing import CliRunner
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from inference.exceptions import ArtifactError
from inference.integrity import (
    MINILM,
    SIGNATURE_NAME,
    SMOLLM2,
    PinnedModel,
    generate_keypair,
    key_id,
    sha256_file,
    signing_key,
    verify_file,
    verify_manifest,
    write_manifest,
)
from inference.settings import ArtifactSigning, ArtifactTrust

# Hash checks alone, signature not required: the tests of the manifest's file list use it so
# that they do not depend on the session's keys.
UNSIGNED_OK = ArtifactTrust(verify_key="", verify_key_file=None, allow_unsigned=True)


def _pub(key: Ed25519PrivateKey) -> str:
    from cryptography.hazmat.primitives import serialization

    raw = key.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return base64.b64encode(raw).decode()


def _trust(*keys: Ed25519PrivateKey, allow_unsigned: bool = False) -> ArtifactTrust:
    return ArtifactTrust(
        verify_key=",".join(_pub(k) for k in keys),
        verify_key_file=None,
        allow_unsigned=allow_unsigned,
    )


@pytest.fixture
def artifact(tmp_path: Path) -> Path:
    folder = tmp_path / "artifact"
    (folder / "sub").mkdir(parents=True)
    (folder / "weights.bin").write_bytes(b"\x00\x01weights")
    (folder / "config.json").write_text('{"d": 8}', encoding="utf-8")
    (folder / "sub" / "vocab.txt").write_text("a\nb\n", encoding="utf-8")
    return folder


@pytest.fixture(scope="module")
def key() -> Ed25519PrivateKey:
    return Ed25519PrivateKey.generate()


def test_sha256_file_matches_hashlib(tmp_path: Path) -> None:
    path = tmp_path / "f"
    data = bytes(range(256)) * 9000  # spans several read blocks
    path.write_bytes(data)
    assert sha256_file(path) == hashlib.sha256(data).hexdigest()


def test_verify_file_refuses_other_content(tmp_path: Path) -> None:
    path = tmp_path / "f"
    path.write_bytes(b"hello")
    assert verify_file(path, hashlib.sha256(b"hello").hexdigest()) == b"hello"
    with pytest.raises(ArtifactError, match="integrity"):
        verify_file(path, hashlib.sha256(b"hellO").hexdigest())
    with pytest.raises(ArtifactError, match="missing"):
        verify_file(tmp_path / "absent", hashlib.sha256(b"").hexdigest())


def test_manifest_round_trip_carries_extra_fields_and_the_verified_bytes(artifact: Path) -> None:
    path = write_manifest(artifact, {"model": "gen", "data_sha256": {"u.data": "ab"}})
    verified = verify_manifest(artifact, UNSIGNED_OK)
    assert verified.manifest == json.loads(path.read_text())
    assert verified.manifest["model"] == "gen"
    assert verified.signed_by is None
    assert dict(verified.files) == {
        "config.json": b'{"d": 8}',
        "sub/vocab.txt": b"a\nb\n",
        "weights.bin": b"\x00\x01weights",
    }


def test_changed_or_removed_file_is_refused(artifact: Path) -> None:
    write_manifest(artifact, {})
    (artifact / "weights.bin").write_bytes(b"\x00\x01weightz")
    with pytest.raises(ArtifactError, match=r"weights\.bin fails its integrity check"):
        verify_manifest(artifact, UNSIGNED_OK)
    write_manifest(artifact, {})
    (artifact / "sub" / "vocab.txt").unlink()
    with pytest.raises(ArtifactError, match=r"vocab\.txt is missing"):
        verify_manifest(artifact, UNSIGNED_OK)


def test_extra_file_or_link_is_refused(artifact: Path, tmp_path: Path) -> None:
    write_manifest(artifact, {})
    (artifact / "sub" / "payload.py").write_text("print('hi')", encoding="utf-8")
    with pytest.raises(ArtifactError, match=r"payload\.py is not listed"):
        verify_manifest(artifact, UNSIGNED_OK)
    (artifact / "sub" / "payload.py").unlink()
    # A listed file replaced by a link to identical bytes elsewhere: the bytes would match, but
    # what is loaded could change after the check, so links are refused.
    outside = tmp_path / "outside.bin"
    outside.write_bytes((artifact / "weights.bin").read_bytes())
    (artifact / "weights.bin").unlink()
    (artifact / "weights.bin").symlink_to(outside)
    with pytest.raises(ArtifactError, match="link"):
        verify_manifest(artifact, UNSIGNED_OK)


def test_manifest_may_not_list_paths_outside_or_reserved_keys(artifact: Path) -> None:
    write_manifest(artifact, {})
    manifest = json.loads((artifact / "manifest.json").read_text())
    manifest["files"]["../escape"] = "0" * 64
    (artifact / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ArtifactError, match="invalid entry"):
        verify_manifest(artifact, UNSIGNED_OK)
    with pytest.raises(ArtifactError, match="reserved"):
        write_manifest(artifact, {"files": {}})


def test_signed_manifest_is_accepted_and_names_its_key(
    artifact: Path, key: Ed25519PrivateKey
) -> None:
    write_manifest(artifact, {"model": "gen"}, key)
    verified = verify_manifest(artifact, _trust(key))
    assert verified.signed_by == key_id(key.public_key())
    assert json.loads((artifact / SIGNATURE_NAME).read_text())["key_id"] == verified.signed_by


def test_rewritten_manifest_is_refused_even_with_consistent_hashes(
    artifact: Path, key: Ed25519PrivateKey
) -> None:
    write_manifest(artifact, {}, key)
    # The attack an unsigned manifest allows: change a file and rewrite its hash.
    (artifact / "weights.bin").write_bytes(b"evil")
    manifest = json.loads((artifact / "manifest.json").read_text())
    manifest["files"]["weights.bin"] = hashlib.sha256(b"evil").hexdigest()
    (artifact / "manifest.json").write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
    with pytest.raises(ArtifactError, match=r"does not match manifest\.json"):
        verify_manifest(artifact, _trust(key))
    # The allow-unsigned escape hatch does not excuse a signature that fails.
    with pytest.raises(ArtifactError, match=r"does not match manifest\.json"):
        verify_manifest(artifact, _trust(key, allow_unsigned=True))


def test_signature_by_another_key_is_refused(artifact: Path, key: Ed25519PrivateKey) -> None:
    other = Ed25519PrivateKey.generate()
    write_manifest(artifact, {}, other)
    with pytest.raises(ArtifactError, match="under any configured key"):
        verify_manifest(artifact, _trust(key))


def test_unsigned_is_refused_unless_allowed(artifact: Path, key: Ed25519PrivateKey) -> None:
    write_manifest(artifact, {}, key)
    write_manifest(artifact, {})  # re-written without a key: the old signature is gone
    assert not (artifact / SIGNATURE_NAME).exists()
    with pytest.raises(ArtifactError, match="unsigned"):
        verify_manifest(artifact, _trust(key))
    assert verify_manifest(artifact, _trust(key, allow_unsigned=True)).signed_by is None


def test_signed_artifact_without_a_configured_key_is_refused(
    artifact: Path, key: Ed25519PrivateKey
) -> None:
    write_manifest(artifact, {}, key)
    with pytest.raises(ArtifactError, match="no artifact verify key is configured"):
        verify_manifest(artifact, _trust())


def test_rotation_accepts_every_listed_key_from_the_setting_or_a_file(
    artifact: Path, key: Ed25519PrivateKey, tmp_path: Path
) -> None:
    new = Ed25519PrivateKey.generate()
    both = _trust(key, new)
    write_manifest(artifact, {}, key)
    assert verify_manifest(artifact, both).signed_by == key_id(key.public_key())
    write_manifest(artifact, {}, new)
    assert verify_manifest(artifact, both).signed_by == key_id(new.public_key())
    keys_file = tmp_path / "verify.pub"
    keys_file.write_text(f"{_pub(key)}\n{_pub(new)}\n", encoding="ascii")
    from_file = ArtifactTrust(verify_key="", verify_key_file=keys_file, allow_unsigned=False)
    assert verify_manifest(artifact, from_file).signed_by == key_id(new.public_key())


def test_trust_and_signing_key_are_read_from_the_environment(
    artifact: Path, key: Ed25519PrivateKey, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    key_path, pub_path = generate_keypair(tmp_path / "keys")
    for name in ("SIGNING_KEY", "VERIFY_KEY", "ALLOW_UNSIGNED"):
        monkeypatch.delenv(f"RECSTREAM_ARTIFACT_{name}", raising=False)
    monkeypatch.setenv("RECSTREAM_ARTIFACT_SIGNING_KEY_FILE", str(key_path))
    monkeypatch.setenv("RECSTREAM_ARTIFACT_VERIFY_KEY_FILE", str(pub_path))
    env_key = signing_key(ArtifactSigning())
    assert env_key is not None
    write_manifest(artifact, {}, env_key)
    assert verify_manifest(artifact).signed_by == key_id(env_key.public_key())
    monkeypatch.delenv("RECSTREAM_ARTIFACT_VERIFY_KEY_FILE")
    monkeypatch.setenv("RECSTREAM_ARTIFACT_VERIFY_KEY", _pub(key))
    with pytest.raises(ArtifactError, match="under any configured key"):
        verify_manifest(artifact)


def test_keygen_writes_a_private_key_only_its_owner_reads(tmp_path: Path) -> None:
    from lab.cli import artifact_group

    result = CliRunner().invoke(artifact_group, ["keygen", "--out", str(tmp_path / "k")])
    assert result.exit_code == 0, result.output
    key_path, pub_path = (
        tmp_path / "k" / "artifact-signing.key",
        tmp_path / "k" / "artifact-signing.pub",
    )
    assert stat.S_IMODE(os.stat(key_path).st_mode) == 0o600
    private = key_path.read_text().strip()
    assert private not in result.output
    assert pub_path.read_text().strip() in result.output
    # Never overwrites: a second run would otherwise destroy the only copy of a key.
    again = CliRunner().invoke(artifact_group, ["keygen", "--out", str(tmp_path / "k")])
    assert again.exit_code != 0
    assert key_path.read_text().strip() == private


def test_private_key_never_appears_in_repr_errors_or_logs(
    artifact: Path, caplog: pytest.LogCaptureFixture, tmp_path: Path
) -> None:
    key_path, _ = generate_keypair(tmp_path / "keys")
    secret = key_path.read_text().strip()
    settings = ArtifactSigning(signing_key=secret, signing_key_file=None)
    assert secret not in repr(settings) and secret not in str(settings)
    assert secret not in settings.model_dump_json()
    caplog.set_level(logging.DEBUG)
    key = signing_key(settings)
    assert key is not None
    write_manifest(artifact, {}, key)
    verify_manifest(artifact, _trust(key))
    # A malformed key is reported without quoting it.
    broken = secret[:-4] + "@@@="
    with pytest.raises(ArtifactError) as err:
        signing_key(ArtifactSigning(signing_key=broken, signing_key_file=None))
    assert broken not in str(err.value) and secret[:20] not in str(err.value)
    everything = caplog.text + "".join(
        (artifact / name).read_text() for name in ("manifest.json", SIGNATURE_NAME)
    )
    assert secret not in everything and secret[:20] not in everything


def test_packaged_models_are_loaded_from_a_copy_of_exactly_the_pinned_files() -> None:
    package = MINILM.folder()
    assert (package / "README.md").is_file()  # the package folder holds unpinned files
    with MINILM.verified_copy() as copy:
        inside = {p.relative_to(copy).as_posix() for p in copy.rglob("*") if p.is_file()}
        assert inside == set(MINILM.files)
        assert stat.S_IMODE(os.stat(copy).st_mode) == 0o700
    assert not copy.exists()
    with SMOLLM2.verified_copy() as copy:
        assert {p.name for p in copy.iterdir()} == set(SMOLLM2.files)  # no __init__.py


def test_pinned_model_refuses_a_changed_file_and_ignores_extras(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "weights.bin").write_bytes(b"pinned")
    (tmp_path / "config.json").write_text('{"auto_map": "evil.Model"}')  # not pinned
    (tmp_path / "evil.py").write_text("raise SystemExit")
    model = PinnedModel("pkg", "", {"weights.bin": hashlib.sha256(b"pinned").hexdigest()})
    monkeypatch.setattr(model, "folder", lambda: tmp_path)
    with model.verified_copy() as copy:
        assert [p.name for p in copy.iterdir()] == ["weights.bin"]
    (tmp_path / "weights.bin").write_bytes(b"swapped")
    with pytest.raises(ArtifactError, match="integrity"), model.verified_copy():
        pass


def test_sign_adopts_an_unsigned_artifact_only_when_its_hashes_hold_and_rotates_keys(
    artifact: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from lab.cli import artifact_group

    old_key, old_pub = generate_keypair(tmp_path / "old")
    new_key, new_pub = generate_keypair(tmp_path / "new")
    for name in ("SIGNING_KEY", "VERIFY_KEY", "ALLOW_UNSIGNED", "SIGNING_KEY_FILE"):
        monkeypatch.delenv(f"RECSTREAM_ARTIFACT_{name}", raising=False)
    monkeypatch.setenv("RECSTREAM_ARTIFACT_VERIFY_KEY_FILE", str(old_pub))
    sign = ["sign", str(artifact), "--signing-key-file", str(old_key)]
    write_manifest(artifact, {"version": "v1"})
    (artifact / "weights.bin").write_bytes(b"tampered")
    refused = CliRunner().invoke(artifact_group, [*sign, "--adopt-unsigned"])
    assert refused.exit_code != 0 and "integrity" in refused.output
    assert not (artifact / SIGNATURE_NAME).exists()
    write_manifest(artifact, {"version": "v1"})
    assert CliRunner().invoke(artifact_group, sign).exit_code != 0  # unsigned, not adopted
    adopted = CliRunner().invoke(artifact_group, [*sign, "--adopt-unsigned"])
    assert adopted.exit_code == 0, adopted.output
    assert verify_manifest(artifact).manifest["version"] == "v1"
    # Rotation: services trust both keys, the artifact is re-signed with the new one, then
    # the old key is retired.
    (tmp_path / "both.pub").write_text(old_pub.read_text() + new_pub.read_text())
    monkeypatch.setenv("RECSTREAM_ARTIFACT_VERIFY_KEY_FILE", str(tmp_path / "both.pub"))
    resign = ["sign", str(artifact), "--signing-key-file", str(new_key)]
    rotated = CliRunner().invoke(artifact_group, resign)
    assert rotated.exit_code == 0, rotated.output
    monkeypatch.setenv("RECSTREAM_ARTIFACT_VERIFY_KEY_FILE", str(new_pub))
    assert verify_manifest(artifact).signed_by is not None
    monkeypatch.setenv("RECSTREAM_ARTIFACT_VERIFY_KEY_FILE", str(old_pub))
    with pytest.raises(ArtifactError, match="under any configured key"):
        verify_manifest(artifact)
