"""homesafe's own key to a restic repository, so that opening it costs no key derivation.

Every restic command first derives a key from the passphrase: scrypt, with parameters
``restic init`` calibrated to take about half a second on the machine that made the
repository (N = 32768, r = 8, p = 4 to 7 on these machines). That half second is in
every backup, listing and restore homesafe makes, twice in a restore (it lists and
extracts side by side), and it is most of an unchanged backup of a small app.

The cost is what makes a passphrase slow to guess, and a passphrase a person chose may
be guessable. A password of 32 random bytes is not: no derivation makes 2^256 guesses
fewer. So homesafe adds a key of its own to a restic repository whose passphrase is kept
in a file: restic's master key, sealed as restic seals it (AES-256-CTR, Poly1305-AES),
under a random password derived with cheap scrypt parameters (:data:`SCRYPT_PARAMETERS`).
The password is kept in ``secrets/<name>.restic-key`` (0600), beside the passphrase file,
which already opens the repository: nothing that opens it is at rest that was not before.
restic lists the key as ``homesafe@<host>``; homesafe opens the repository with it
(``--key-hint``) and falls back to the passphrase when it is gone
(:func:`homesafe.engines.restic.run_restic`).

Not for a passphrase from the environment or a command: homesafe does not put at rest a
secret that opens a repository whose person chose to keep its passphrase elsewhere.

The key file reaches the repository as restic's own backends would write it: a file for
a local path, ``sftp`` for sftp, an S3 PUT (signature version 4, written here: one
request, where a client library would be homesafe's largest dependency) for S3.
"""

from __future__ import annotations

import base64
import datetime
import hashlib
import hmac
import json
import os
import stat
import tempfile
from dataclasses import dataclass
from pathlib import Path

from homesafe import execute, locations
from homesafe.errors import EngineError
from homesafe.repositories import Location, Repository, ssh_options

USERNAME = "homesafe"
# scrypt's cheapest sound parameters: the password's 256 random bits, not the
# derivation, are what keeps it from being guessed. About a millisecond.
SCRYPT_PARAMETERS = {"N": 1024, "r": 8, "p": 1}
SALT_BYTES = 64  # restic refuses any other salt length
NONCE_BYTES = 16
S3_TIMEOUT_SECONDS = 60
SFTP_TIMEOUT_SECONDS = 120


@dataclass(frozen=True)
class OwnKey:
    """A key homesafe added to a repository: its id (the key file's name), the
    password that opens it, and the repository location it belongs to."""

    key_id: str
    password: str
    location: str


def wanted(repository: Repository) -> bool:
    """Whether homesafe keeps a key of its own to ``repository``: a restic repository
    whose passphrase is kept in a file."""
    return (
        repository.engine == "restic"
        and repository.encryption != "none"
        and repository.passphrase_file is not None
        and not repository.passphrase_environment
        and not repository.passphrase_command
    )


def secret_file(name: str) -> Path:
    """Where the password of homesafe's key to the repository ``name`` is kept."""
    return locations.home() / "secrets" / f"{name}.restic-key"


def _record(repository: Repository) -> dict[str, object] | None:
    """What ``secrets/<name>.restic-key`` says of ``repository``: None when there is no
    such file, or it speaks of a repository of the same name at another location."""
    if not wanted(repository):
        return None
    try:
        recorded = json.loads(secret_file(repository.name).read_text())
    except (FileNotFoundError, ValueError):
        return None
    if not isinstance(recorded, dict) or recorded.get("location") != repository.location:
        return None
    return recorded


def load(repository: Repository) -> OwnKey | None:
    """homesafe's key to ``repository``, or None when it has none."""
    recorded = _record(repository) or {}
    key = OwnKey(
        key_id=str(recorded.get("key_id", "")),
        password=str(recorded.get("password", "")),
        location=str(recorded.get("location", "")),
    )
    return key if key.key_id and key.password else None


def declined(repository: Repository) -> bool:
    """Whether restic refused homesafe's key to ``repository`` (see :func:`decline`)."""
    return bool((_record(repository) or {}).get("declined"))


def save(repository: Repository, key: OwnKey) -> None:
    _write(repository, {"location": key.location, "key_id": key.key_id, "password": key.password})


def _write(repository: Repository, record: dict[str, object]) -> None:
    locations.secrets_directory()  # made 0700 if missing
    locations.write_secret_file(secret_file(repository.name), json.dumps(record) + "\n")


def forget(name: str) -> None:
    """Drop what homesafe keeps of its key to the repository ``name`` (the key itself, in
    the repository, opens nothing without the password)."""
    secret_file(name).unlink(missing_ok=True)


def decline(repository: Repository) -> None:
    """Drop the password of a key restic no longer accepts (someone removed it with
    ``restic key remove``, or another repository is at the location now), and remember
    that: no new key is made for the repository until it is registered again."""
    _write(repository, {"location": repository.location, "declined": True})


def new_key(repository: Repository, master_key: str) -> tuple[OwnKey, bytes]:
    """A new key for ``repository`` under a new random password, and its key file, from
    the master key as ``restic cat masterkey`` prints it."""
    import secrets

    password = secrets.token_urlsafe(32)
    content = seal(master_key, password, hostname=locations.hostname())
    key_id = hashlib.sha256(content).hexdigest()
    return OwnKey(key_id=key_id, password=password, location=repository.location), content


def seal(master_key: str, password: str, *, hostname: str) -> bytes:
    """A restic key file holding ``master_key`` (restic's JSON: ``mac.k``, ``mac.r``,
    ``encrypt``, base64) sealed under ``password``, as restic's ``AddKey`` writes one:
    scrypt gives 64 bytes, the AES-256 key and then the Poly1305-AES key (k, r); the
    data is nonce, AES-CTR ciphertext, and the MAC of the ciphertext."""
    # cryptography is imported here only: a key is made once per repository.
    from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
    from cryptography.hazmat.primitives.poly1305 import Poly1305

    plaintext = _master_key_json(master_key)
    salt = os.urandom(SALT_BYTES)
    derived = hashlib.scrypt(
        password.encode(),
        salt=salt,
        n=SCRYPT_PARAMETERS["N"],
        r=SCRYPT_PARAMETERS["r"],
        p=SCRYPT_PARAMETERS["p"],
        dklen=64,
    )
    encryption_key, mac_k, mac_r = derived[:32], derived[32:48], derived[48:]
    nonce = os.urandom(NONCE_BYTES)
    ciphertext = (
        Cipher(algorithms.AES(encryption_key), modes.CTR(nonce)).encryptor().update(plaintext)
    )
    # Poly1305-AES: the one-time key is r and AES_k(nonce); Poly1305 clamps r itself.
    # One block, the nonce, under k: what Poly1305-AES is (not ECB over data).
    mac_s = Cipher(algorithms.AES(mac_k), modes.ECB()).encryptor().update(nonce)  # noqa: S305
    tag = Poly1305.generate_tag(mac_r + mac_s, ciphertext)
    created = datetime.datetime.now(datetime.UTC)
    record = {
        "created": created.isoformat().replace("+00:00", "Z"),
        "username": USERNAME,
        "hostname": hostname,
        "kdf": "scrypt",
        **SCRYPT_PARAMETERS,
        "salt": base64.b64encode(salt).decode(),
        "data": base64.b64encode(nonce + ciphertext + tag).decode(),
    }
    return json.dumps(record, separators=(",", ":")).encode()


def _master_key_json(master_key: str) -> bytes:
    """The master key as compact JSON, after checking it is one (so that a restic that
    printed something else is found out here, not by a key that opens nothing)."""
    try:
        parsed = json.loads(master_key)
        parts = {
            "k": base64.b64decode(parsed["mac"]["k"], validate=True),
            "r": base64.b64decode(parsed["mac"]["r"], validate=True),
            "encrypt": base64.b64decode(parsed["encrypt"], validate=True),
        }
    except (ValueError, KeyError, TypeError) as error:
        raise EngineError(f"restic printed no master key: {type(error).__name__}") from None
    if [len(parts["k"]), len(parts["r"]), len(parts["encrypt"])] != [16, 16, 32]:
        raise EngineError("restic printed a master key of unexpected lengths")
    return json.dumps(
        {"mac": {"k": parsed["mac"]["k"], "r": parsed["mac"]["r"]}, "encrypt": parsed["encrypt"]},
        separators=(",", ":"),
    ).encode()


# -- the key file in the repository --------------------------------------------------


def put(repository: Repository, key_id: str, content: bytes) -> None:
    """Write the key file ``keys/<key_id>`` into the repository; OSError or
    CommandError when the location refuses it."""
    location = repository.parsed_location
    if location.kind == "local":
        _put_local(Path(location.path) / "keys", key_id, content)
    elif location.kind == "sftp":
        path = _remote_key_path(location, key_id)
        remote, partial = _quoted(path), _quoted(path + ".tmp")
        with tempfile.NamedTemporaryFile(prefix="homesafe-key-") as local:
            local.write(content)
            local.flush()
            _sftp(location, f"put {_quoted(local.name)} {partial}\nrename {partial} {remote}\n")
    elif location.kind == "s3":
        _s3_request(repository, "PUT", key_id, content)
    else:
        raise EngineError(f"restic does not use {location.kind} locations")


def delete(repository: Repository, key_id: str) -> None:
    """Delete the key file ``keys/<key_id>`` again (one that restic did not accept)."""
    location = repository.parsed_location
    if location.kind == "local":
        (Path(location.path) / "keys" / key_id).unlink(missing_ok=True)
    elif location.kind == "sftp":
        _sftp(location, f"rm {_quoted(_remote_key_path(location, key_id))}\n")
    elif location.kind == "s3":
        _s3_request(repository, "DELETE", key_id, b"")


def _put_local(keys: Path, key_id: str, content: bytes) -> None:
    """Written as a secret file is (0600, under a temporary name, renamed), then given
    the mode restic gave the repository's other key files (0400 unless the repository
    is shared)."""
    existing = [path for path in keys.iterdir() if not path.name.startswith(".")]
    mode = stat.S_IMODE(existing[0].stat().st_mode) if existing else 0o400
    locations.write_secret_file(keys / key_id, content.decode())
    os.chmod(keys / key_id, mode)


def _remote_key_path(location: Location, key_id: str) -> str:
    return f"{location.path.rstrip('/')}/keys/{key_id}"


def _quoted(path: str) -> str:
    """``path`` in double quotes, as an sftp batch line takes it."""
    if '"' in path or "\n" in path:
        raise EngineError(f"homesafe cannot name {path!r} to sftp")
    return f'"{path}"'


def _sftp(location: Location, batch: str) -> None:
    """Run an sftp batch against ``location``'s host with homesafe's ssh options (its
    key, its known_hosts, never a question); it stops at the first command that fails."""
    argv = ["sftp", "-b", "-", *ssh_options()]
    if location.port:
        argv += ["-P", str(location.port)]
    argv.append(f"{location.user}@{location.host}")
    execute.run(argv, input_data=batch.encode(), timeout=SFTP_TIMEOUT_SECONDS)


def _s3_request(repository: Repository, method: str, key_id: str, body: bytes) -> None:
    """One signed (AWS signature version 4) path-style request for the object
    ``<prefix>/keys/<key_id>``, with the repository's access keys; OSError unless the
    server answers 2xx. The region is AWS_DEFAULT_REGION's, else us-east-1 (what S3
    servers other than AWS's take)."""
    import http.client
    import urllib.parse

    location = repository.parsed_location
    credentials = repository.s3_credentials()
    endpoint = urllib.parse.urlsplit(location.endpoint)
    bucket, _, prefix = location.path.partition("/")
    key = "/".join(part for part in (prefix.strip("/"), "keys", key_id) if part)
    path = urllib.parse.quote(f"/{bucket}/{key}", safe="/-_.~")
    region = os.environ.get("AWS_DEFAULT_REGION") or "us-east-1"
    now = datetime.datetime.now(datetime.UTC)
    stamp = now.strftime("%Y%m%dT%H%M%SZ")
    payload_hash = hashlib.sha256(body).hexdigest()
    headers = {
        "host": endpoint.netloc,
        "x-amz-content-sha256": payload_hash,
        "x-amz-date": stamp,
    }
    if os.environ.get("AWS_SESSION_TOKEN"):
        headers["x-amz-security-token"] = os.environ["AWS_SESSION_TOKEN"]
    signed = ";".join(sorted(headers))
    canonical = "\n".join(
        [
            method,
            path,
            "",
            "".join(f"{name}:{headers[name]}\n" for name in sorted(headers)),
            signed,
            payload_hash,
        ]
    )
    scope = f"{stamp[:8]}/{region}/s3/aws4_request"
    to_sign = "\n".join(
        ["AWS4-HMAC-SHA256", stamp, scope, hashlib.sha256(canonical.encode()).hexdigest()]
    )
    signing_key = ("AWS4" + credentials["AWS_SECRET_ACCESS_KEY"]).encode()
    for part in scope.split("/"):
        signing_key = hmac.new(signing_key, part.encode(), hashlib.sha256).digest()
    signature = hmac.new(signing_key, to_sign.encode(), hashlib.sha256).hexdigest()
    headers["authorization"] = (
        f"AWS4-HMAC-SHA256 Credential={credentials['AWS_ACCESS_KEY_ID']}/{scope}, "
        f"SignedHeaders={signed}, Signature={signature}"
    )
    connection_class = (
        http.client.HTTPSConnection if endpoint.scheme == "https" else http.client.HTTPConnection
    )
    connection = connection_class(endpoint.netloc, timeout=S3_TIMEOUT_SECONDS)
    try:
        connection.request(method, path, body=body, headers=headers)
        response = connection.getresponse()
        answer = response.read(2048)
    finally:
        connection.close()
    if not 200 <= response.status < 300:
        raise OSError(
            f"{location.endpoint} answered {method} of {key} with {response.status} "
            f"{response.reason}: {answer.decode(errors='replace')[:300]}"
        )
