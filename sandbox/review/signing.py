"""Signed releases: Ed25519 over the exact content a reviewer approved.

A release artifact is ``{"payload": {...}, "signature": base64, "key_id": hex}`` where the
payload names the job, the SHA-256 of the approved content, the content itself and the
time of release; the signature covers the canonical JSON of the payload. Anyone with the
public key (``GET /v1/releases/public-key``) can check it: ``sandbox release verify FILE``.
The signing key is a 0600 file in the home's key directory, created on first use.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
from pathlib import Path
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import (
    Ed25519PrivateKey,
    Ed25519PublicKey,
)


class ReleaseInvalid(Exception):
    """A release artifact whose signature, key or content hash does not check out."""


def canonical(payload: dict[str, Any]) -> bytes:
    return json.dumps(payload, sort_keys=True, separators=(",", ":"), ensure_ascii=False,
                      allow_nan=False).encode()


def key_id(public: Ed25519PublicKey) -> str:
    raw = public.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return hashlib.sha256(raw).hexdigest()[:16]


class Signer:
    """Holds the release signing key (``<keys_dir>/release-signing.key``, 0600)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        if not path.exists():
            path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
            private = Ed25519PrivateKey.generate()
            pem = private.private_bytes(serialization.Encoding.PEM,
                                        serialization.PrivateFormat.PKCS8,
                                        serialization.NoEncryption())
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "wb") as handle:
                handle.write(pem)
        loaded = serialization.load_pem_private_key(path.read_bytes(), password=None)
        if not isinstance(loaded, Ed25519PrivateKey):
            raise ReleaseInvalid(f"{path} is not an Ed25519 private key")
        self._private = loaded
        self.public = loaded.public_key()
        self.key_id = key_id(self.public)

    def public_pem(self) -> str:
        return self.public.public_bytes(serialization.Encoding.PEM,
                                        serialization.PublicFormat.SubjectPublicKeyInfo).decode()

    def sign(self, payload: dict[str, Any]) -> dict[str, Any]:
        signature = self._private.sign(canonical(payload))
        return {"payload": payload, "signature": base64.b64encode(signature).decode(),
                "key_id": self.key_id, "algorithm": "Ed25519"}


def verify(artifact: dict[str, Any], public_pem: str) -> dict[str, Any]:
    """The payload if the artifact is intact and signed by ``public_pem``; else raise."""
    try:
        public = serialization.load_pem_public_key(public_pem.encode())
    except ValueError:
        raise ReleaseInvalid("the public key is not a PEM public key") from None
    if not isinstance(public, Ed25519PublicKey):
        raise ReleaseInvalid("the public key is not an Ed25519 key")
    try:
        payload = artifact["payload"]
        signature = base64.b64decode(artifact["signature"], validate=True)
    except (KeyError, TypeError, ValueError):
        raise ReleaseInvalid("the file is not a release artifact") from None
    if artifact.get("key_id") != key_id(public):
        raise ReleaseInvalid("the release was signed with another key")
    try:
        public.verify(signature, canonical(payload))
    except InvalidSignature:
        raise ReleaseInvalid("the signature does not match: the release was altered") from None
    digest = hashlib.sha256(canonical(payload["content"])).hexdigest()
    if digest != payload.get("sha256"):
        raise ReleaseInvalid("the content does not match the approved hash")
    result: dict[str, Any] = payload
    return result
