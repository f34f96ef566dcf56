"""ed25519 signatures over an artifact's manifest, so a deployment can refuse artifacts it did not build.

An artifact's ``model.so`` is native code: loading it runs it. The manifest's checksums catch
corruption, not an attacker who rewrites the manifest too. A signature over ``manifest.json``
(which holds the sha256 of every other file) by a key the deployment trusts closes that gap:
``lowbit sign ARTIFACT --key KEY`` adds one, ``load(path, trusted_keys=[...])`` and
``lowbit run --require-signature --trusted-key KEY.pub`` refuse an artifact without a valid one
before any of its files is loaded.

Keys are PEM files (PKCS#8 private, SubjectPublicKeyInfo public) as ``lowbit keygen`` or
``openssl genpkey -algorithm ed25519`` write them. Signatures live in ``manifest.sig``, a JSON list
of ``{"public_key": hex, "signature": hex}`` (one entry per signing key), written atomically.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path

from .artifact import MANIFEST, SIGNATURES, read_manifest
from lowbit.codegen.errors import LowbitError


def _serialization():
    from cryptography.hazmat.primitives import serialization

    return serialization


def fingerprint(public_raw: bytes) -> str:
    """A short, stable name for a public key: ``SHA256:`` and the first 16 hex digits of its hash."""
    return "SHA256:" + hashlib.sha256(public_raw).hexdigest()[:16]


def _public_raw(key) -> bytes:
    serialization = _serialization()
    return key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


def load_private_key(path: str | os.PathLike):
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    try:
        key = _serialization().load_pem_private_key(Path(path).read_bytes(), password=None)
    except (OSError, ValueError, TypeError) as exc:
        raise LowbitError(f"key {path}: not a readable unencrypted PEM private key ({exc})") from None
    if not isinstance(key, Ed25519PrivateKey):
        raise LowbitError(f"key {path}: a {type(key).__name__}, not an ed25519 key; make one with `lowbit keygen`")
    return key


def load_public_key(path: str | os.PathLike) -> bytes:
    """The raw 32 bytes of the ed25519 public key in the PEM file at ``path``."""
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

    try:
        key = _serialization().load_pem_public_key(Path(path).read_bytes())
    except (OSError, ValueError, TypeError) as exc:
        raise LowbitError(f"trusted key {path}: not a readable PEM public key ({exc})") from None
    if not isinstance(key, Ed25519PublicKey):
        raise LowbitError(f"trusted key {path}: a {type(key).__name__}, not an ed25519 public key")
    return _public_raw(key)


def generate_key(path: str | os.PathLike) -> tuple[Path, Path]:
    """Write a new private key at ``path`` (mode 0600) and its public key at ``path.pub``; never
    overwrites a file."""
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    serialization = _serialization()
    private_path, public_path = Path(path), Path(f"{path}.pub")
    for existing in (private_path, public_path):
        if existing.exists():
            raise LowbitError(f"key file {existing} already exists; lowbit never overwrites it: pick another name")
    key = Ed25519PrivateKey.generate()
    private_pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                    serialization.NoEncryption())
    public_pem = key.public_key().public_bytes(serialization.Encoding.PEM,
                                               serialization.PublicFormat.SubjectPublicKeyInfo)
    try:
        descriptor = os.open(private_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(descriptor, "wb") as f:
            f.write(private_pem)
        descriptor = os.open(public_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        with os.fdopen(descriptor, "wb") as f:
            f.write(public_pem)
    except OSError as exc:
        raise LowbitError(f"key file {exc.filename}: cannot write it ({exc.strerror})") from None
    return private_path, public_path


def _read_signatures(artifact_dir: Path) -> list[dict]:
    path = artifact_dir / SIGNATURES
    if not path.exists():
        return []
    try:
        entries = json.loads(path.read_bytes().decode("utf-8"))
        if not isinstance(entries, list):
            raise ValueError("not a list")
        return [{"public_key": bytes.fromhex(e["public_key"]), "signature": bytes.fromhex(e["signature"])}
                for e in entries]
    except (OSError, ValueError, TypeError, KeyError, UnicodeDecodeError, RecursionError) as exc:
        raise LowbitError(f"artifact {artifact_dir}: {SIGNATURES} is malformed ({exc}); sign the artifact again") \
            from None


def _valid(public_raw: bytes, signature: bytes, message: bytes) -> bool:
    from cryptography.exceptions import InvalidSignature
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

    try:
        Ed25519PublicKey.from_public_bytes(public_raw).verify(signature, message)
    except (InvalidSignature, ValueError):
        return False
    return True


def signatures(artifact_dir: str | os.PathLike) -> list[dict]:
    """Each signature of the artifact: the signing key's fingerprint and whether it verifies."""
    artifact_dir = Path(artifact_dir)
    message = (artifact_dir / MANIFEST).read_bytes()
    return [{"key": fingerprint(e["public_key"]), "valid": _valid(e["public_key"], e["signature"], message)}
            for e in _read_signatures(artifact_dir)]


def sign_artifact(artifact_dir: str | os.PathLike, key_path: str | os.PathLike) -> str:
    """Verify the artifact, then add (or renew) its signature by the key at ``key_path``; returns
    the key's fingerprint."""
    artifact_dir = Path(artifact_dir)
    key = load_private_key(key_path)
    read_manifest(artifact_dir)
    message = (artifact_dir / MANIFEST).read_bytes()
    public_raw = _public_raw(key.public_key())
    entries = [e for e in _read_signatures(artifact_dir) if e["public_key"] != public_raw]
    entries.append({"public_key": public_raw, "signature": key.sign(message)})
    text = json.dumps([{k: v.hex() for k, v in e.items()} for e in entries], indent=2) + "\n"
    descriptor, tmp = tempfile.mkstemp(dir=artifact_dir, prefix=f".{SIGNATURES}.tmp-")
    try:
        with os.fdopen(descriptor, "w", encoding="utf-8") as f:
            f.write(text)
        mask = os.umask(0)
        os.umask(mask)
        os.chmod(tmp, 0o666 & ~mask)
        os.replace(tmp, artifact_dir / SIGNATURES)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return fingerprint(public_raw)


def require_signature(artifact_dir: Path, message: bytes, trusted_keys) -> str:
    """Raise unless ``message`` (the bytes of ``manifest.json``) carries a valid signature by one of
    ``trusted_keys`` (PEM public key files, or raw 32-byte keys); returns the signing key's fingerprint."""
    trusted = [key if isinstance(key, bytes) else load_public_key(key) for key in trusted_keys]
    if not trusted:
        raise LowbitError("a signature is required but no trusted key was given (--trusted-key KEY.pub)")
    for entry in _read_signatures(artifact_dir):
        if entry["public_key"] in trusted and _valid(entry["public_key"], entry["signature"], message):
            return fingerprint(entry["public_key"])
    names = ", ".join(fingerprint(k) for k in trusted)
    raise LowbitError(f"artifact {artifact_dir} is not signed by a trusted key ({names}); refusing to load it. "
                      "Sign it with `lowbit sign` or trust the key that built it")
