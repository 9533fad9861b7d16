"""homesafe's own restic key, without restic: which repositories get one, how its
password is kept and read back, and what a sealed key file holds. That restic accepts
the key files is tested with restic itself (tests/integration/test_restic_own_key.py)."""

from __future__ import annotations

import base64
import hashlib
import json
from pathlib import Path

import pytest

from homesafe.engines import restic_key
from homesafe.errors import EngineError
from homesafe.repositories import Repository

MASTER_KEY = json.dumps(
    {
        "mac": {
            "k": base64.b64encode(bytes(range(16))).decode(),
            "r": base64.b64encode(bytes(range(16, 32))).decode(),
        },
        "encrypt": base64.b64encode(bytes(range(32, 64))).decode(),
    },
    indent=2,
)


def restic_repository(tmp_path: Path, **changes: object) -> Repository:
    values: dict[str, object] = {
        "name": "offsite",
        "location": str(tmp_path / "repository"),
        "engine": "restic",
        "encryption": "repokey",
        "passphrase_file": tmp_path / "passphrase",
    }
    values.update(changes)
    return Repository(**values)  # type: ignore[arg-type]


def test_only_a_restic_repository_whose_passphrase_is_in_a_file_gets_one(
    tmp_path: Path,
) -> None:
    assert restic_key.wanted(restic_repository(tmp_path))
    assert not restic_key.wanted(restic_repository(tmp_path, engine="borg"))
    assert not restic_key.wanted(
        restic_repository(tmp_path, passphrase_file=None, passphrase_environment="PASS")
    )
    assert not restic_key.wanted(
        restic_repository(tmp_path, passphrase_file=None, passphrase_command=("pass", "x"))
    )


def test_the_password_is_kept_0600_and_read_back_for_its_location_only(
    homesafe_env: Path, tmp_path: Path
) -> None:
    repository = restic_repository(tmp_path)
    assert restic_key.load(repository) is None
    key = restic_key.OwnKey("ab" * 32, "a random password", repository.location)

    restic_key.save(repository, key)

    assert restic_key.secret_file("offsite").stat().st_mode & 0o777 == 0o600
    assert restic_key.load(repository) == key
    # Another repository under the same name, at another location: not its key.
    assert restic_key.load(restic_repository(tmp_path, location="/elsewhere")) is None
    restic_key.forget("offsite")
    assert restic_key.load(repository) is None


def test_a_declined_key_is_remembered_without_its_password(
    homesafe_env: Path, tmp_path: Path
) -> None:
    repository = restic_repository(tmp_path)
    restic_key.save(
        repository, restic_key.OwnKey("ab" * 32, "a random password", repository.location)
    )

    restic_key.decline(repository)

    assert restic_key.load(repository) is None
    assert restic_key.declined(repository)
    assert "a random password" not in restic_key.secret_file("offsite").read_text()
    assert not restic_key.declined(restic_repository(tmp_path, location="/elsewhere"))
    restic_key.forget("offsite")
    assert not restic_key.declined(repository)


def test_a_sealed_key_file_holds_cheap_parameters_and_the_sealed_master_key(
    homesafe_env: Path, tmp_path: Path
) -> None:
    key, content = restic_key.new_key(restic_repository(tmp_path), MASTER_KEY)

    record = json.loads(content)
    assert key.key_id == hashlib.sha256(content).hexdigest()
    assert len(key.password) >= 43  # 32 random bytes
    assert record["kdf"] == "scrypt" and record["username"] == restic_key.USERNAME
    assert {name: record[name] for name in ("N", "r", "p")} == restic_key.SCRYPT_PARAMETERS
    assert len(base64.b64decode(record["salt"])) == restic_key.SALT_BYTES
    sealed = base64.b64decode(record["data"])
    compact = json.dumps(json.loads(MASTER_KEY), separators=(",", ":")).encode()
    # nonce, the ciphertext (as long as the compact master key), the MAC
    assert len(sealed) == restic_key.NONCE_BYTES + len(compact) + 16
    master = json.loads(MASTER_KEY)
    for value in (master["mac"]["k"], master["mac"]["r"], master["encrypt"]):
        assert value.encode() not in content and value.encode() not in sealed
    # Two keys of the same master key share nothing: password, salt, nonce are new.
    other, other_content = restic_key.new_key(restic_repository(tmp_path), MASTER_KEY)
    assert other.password != key.password and other_content != content


@pytest.mark.parametrize(
    "printed",
    [
        "",
        "Fatal: wrong password",
        json.dumps({"mac": {"k": "AAAA", "r": "AAAA"}, "encrypt": "AAAA"}),
        json.dumps({"encrypt": base64.b64encode(bytes(32)).decode()}),
    ],
)
def test_something_else_than_a_master_key_is_refused(
    homesafe_env: Path, tmp_path: Path, printed: str
) -> None:
    with pytest.raises(EngineError):
        restic_key.new_key(restic_repository(tmp_path), printed)
