"""Signed releases: Ed25519 over the exact content a reviewer approved.

A release artifact is ``{"payload": {...}, "signature": base64, "key_id": hex}`` where the
payload names the job, the SHA-256 of the approved content, the content itself and the
time of release; the signature covers the canonical JSON of the payload. Anyone with the
public key (``GET /v1/releases/public-key``) can check it: ``sandbox release verify FILE``.

Two signers make the same artifacts: :class:`FileSigner` keeps the key in a 0600 file in
the home's key directory; :class:`TokenSigner` keeps it in a PKCS#11 token (non-extractable,
signing with ``CKM_EDDSA`` inside the token). Either is created on first use.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import secrets
import threading
import time
from abc import ABC, abstractmethod
from pathlib import Path
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import (
    Ed25519PrivateKey,
    Ed25519PublicKey,
)

from sandbox.datasets.keys import KeyUnavailable


class ReleaseInvalid(Exception):
    """A release artifact whose signature, key or content hash does not check out."""


def canonical(payload: dict[str, Any]) -> bytes:
    return json.dumps(payload, sort_keys=True, separators=(",", ":"), ensure_ascii=False,
                      allow_nan=False).encode()


def key_id(public: Ed25519PublicKey) -> str:
    raw = public.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return hashlib.sha256(raw).hexdigest()[:16]


class Signer(ABC):
    """Signs release payloads with an Ed25519 key.

    Contract: ``public`` is the Ed25519 public key, ``key_id`` its :func:`key_id`, and
    :meth:`sign` returns ``{"payload", "signature" (base64), "key_id", "algorithm":
    "Ed25519"}`` whose signature covers :func:`canonical` of the payload, so that
    :func:`verify` with :meth:`public_pem` accepts it.
    """

    public: Ed25519PublicKey
    key_id: str

    @abstractmethod
    def _sign_bytes(self, data: bytes) -> bytes:
        """The 64-byte Ed25519 signature of ``data``."""

    def public_pem(self) -> str:
        return self.public.public_bytes(serialization.Encoding.PEM,
                                        serialization.PublicFormat.SubjectPublicKeyInfo).decode()

    def sign(self, payload: dict[str, Any]) -> dict[str, Any]:
        signature = self._sign_bytes(canonical(payload))
        return {"payload": payload, "signature": base64.b64encode(signature).decode(),
                "key_id": self.key_id, "algorithm": "Ed25519"}

    def close(self) -> None:
        """Release what the signer holds open (nothing for a key file)."""
        return None


class FileSigner(Signer):
    """Holds the release signing key in a file (``<keys_dir>/release-signing.key``, 0600)."""

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

    def _sign_bytes(self, data: bytes) -> bytes:
        return self._private.sign(data)


# DER of the Ed25519 curve OID 1.3.101.112 (CKA_EC_PARAMS of an Ed25519 key pair)
_ED25519_PARAMS = bytes.fromhex("06032b6570")


class TokenSigner(Signer):
    """The release signing key as an Ed25519 key pair in a PKCS#11 token.

    The pair is labelled ``label``; the private key is sensitive and non-extractable and
    signs inside the token (``CKM_EDDSA``). It is generated on first use and found by its
    label afterwards. Two key pairs under the label are refused (:class:`KeyUnavailable`)
    rather than guessed between; a creator that finds it raced another process destroys
    its own pair and takes the other's.
    """

    def __init__(self, module: Path, token_label: str, pin_file: Path,
                 label: str = "sandbox-release-signing") -> None:
        from sandbox.datasets.pkcs11 import open_session
        self.label = label
        self._lock = threading.Lock()
        self._closed = False
        self._session = open_session(module, token_label, pin_file)
        try:
            self._private, public_obj = self._find_or_create()
            self.public = _public_key(public_obj)
        except BaseException:
            self.close()
            raise
        self.key_id = key_id(self.public)

    def _pairs(self) -> list[tuple[bytes, Any, Any]]:
        """``(CKA_ID, private, public)`` of every key pair labelled ``self.label``."""
        from pkcs11 import Attribute, ObjectClass
        with self._lock:
            privates = list(self._session.get_objects(
                {Attribute.CLASS: ObjectClass.PRIVATE_KEY, Attribute.LABEL: self.label}))
            publics = list(self._session.get_objects(
                {Attribute.CLASS: ObjectClass.PUBLIC_KEY, Attribute.LABEL: self.label}))
            by_id = {bytes(obj[Attribute.ID]): obj for obj in publics}
            pairs = []
            for private in privates:
                ident = bytes(private[Attribute.ID])
                if ident not in by_id:
                    raise KeyUnavailable(f"the PKCS#11 key {self.label!r} has no public key "
                                         "with the same CKA_ID in the token")
                pairs.append((ident, private, by_id[ident]))
        return sorted(pairs, key=lambda pair: pair[0])

    def _find_or_create(self) -> tuple[Any, Any]:
        """The ``(private, public)`` pair labelled ``self.label``, generated if there is
        none. A creator that then sees another pair (a process that created one at the
        same moment) destroys its own and looks again, so a label never keeps two pairs."""
        for attempt in range(10):
            pairs = self._pairs()
            if len(pairs) == 1:
                return pairs[0][1], pairs[0][2]
            if len(pairs) > 1:
                if attempt == 0:
                    raise KeyUnavailable(
                        f"{len(pairs)} keys in the PKCS#11 token are labelled {self.label!r}: "
                        "keep the one whose public key clients trust and destroy the others")
                time.sleep(0.05 * attempt)  # other creators are settling
                continue
            ident = secrets.token_bytes(16)
            private, public = self._generate(ident)
            if all(other == ident for other, _priv, _pub in self._pairs()):
                return private, public
            with self._lock:
                private.destroy()
                public.destroy()
            time.sleep(secrets.randbelow(50) / 1000)
        raise KeyUnavailable("could not create the release signing key in the PKCS#11 token: "
                             "other processes keep creating one at the same time")

    def _generate(self, ident: bytes) -> tuple[Any, Any]:
        from pkcs11 import Attribute, KeyType, Mechanism
        with self._lock:
            params = self._session.create_domain_parameters(
                KeyType.EC_EDWARDS, {Attribute.EC_PARAMS: _ED25519_PARAMS}, local=True)
            public, private = params.generate_keypair(
                mechanism=Mechanism.EC_EDWARDS_KEY_PAIR_GEN, store=True, label=self.label,
                id=ident,
                private_template={Attribute.SENSITIVE: True, Attribute.EXTRACTABLE: False,
                                  Attribute.SIGN: True})
        return private, public

    def _sign_bytes(self, data: bytes) -> bytes:
        from pkcs11 import Mechanism
        with self._lock:
            return bytes(self._private.sign(data, mechanism=Mechanism.EDDSA))

    def close(self) -> None:
        """Close the token session; idempotent."""
        with self._lock:
            if not self._closed:
                self._closed = True
                self._session.close()


def _public_key(obj: Any) -> Ed25519PublicKey:
    """The Ed25519 public key of a PKCS#11 public key object (CKA_EC_POINT is the raw
    32 bytes wrapped in a DER OCTET STRING, or the bare 32 bytes in some tokens)."""
    from pkcs11 import Attribute
    point = bytes(obj[Attribute.EC_POINT])
    if len(point) == 34 and point[:2] == b"\x04\x20":
        point = point[2:]
    if len(point) != 32:
        raise ReleaseInvalid("the PKCS#11 release signing key is not an Ed25519 key")
    return Ed25519PublicKey.from_public_bytes(point)


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
