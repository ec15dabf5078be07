"""A keyring in a PKCS#11 token (a hardware HSM, a cloud HSM, or SoftHSM for testing).

Master keys are AES-256 secret keys generated inside the token as sensitive and
non-extractable, labelled ``<prefix>-<generation>``. Wrapping a data key is AES-GCM
encryption performed by the token with the version context as associated data; the
master key never leaves the token. The user PIN is read from a file (never argv).

Wrapped format: ``0x02 | nonce (12) | ciphertext (32) | tag (16)``.
"""

from __future__ import annotations

import re
import secrets
import threading
from pathlib import Path
from typing import Any

from sandbox.datasets.keyring import Keyring
from sandbox.datasets.keys import DATA_KEY_BYTES, KeyProvider, KeyUnavailable

_FORMAT = b"\x02"
_NONCE = 12


class _TokenKey(KeyProvider):
    def __init__(self, ring: Pkcs11Keyring, label: str, key: Any) -> None:
        self._ring = ring
        self._label = label
        self._key = key

    @property
    def key_id(self) -> str:
        return f"pkcs11:{self._label}"

    def wrap(self, data_key: bytes, *, context: bytes) -> bytes:
        from pkcs11 import Mechanism
        from pkcs11.mechanisms import GCMParams
        if len(data_key) != DATA_KEY_BYTES:
            raise ValueError(f"data keys must be {DATA_KEY_BYTES} bytes")
        nonce = secrets.token_bytes(_NONCE)
        with self._ring.lock:
            body = self._key.encrypt(bytes(data_key), mechanism=Mechanism.AES_GCM,
                                     mechanism_param=GCMParams(nonce, bytes(context), 128))
        return _FORMAT + nonce + bytes(body)

    def unwrap(self, wrapped: bytes, *, context: bytes) -> bytes:
        from pkcs11 import Mechanism
        from pkcs11.exceptions import PKCS11Error
        from pkcs11.mechanisms import GCMParams
        if wrapped[:1] != _FORMAT or len(wrapped) != 1 + _NONCE + DATA_KEY_BYTES + 16:
            raise KeyUnavailable("wrapped data key is malformed (expected PKCS#11 format 2)")
        nonce, body = bytes(wrapped[1:1 + _NONCE]), bytes(wrapped[1 + _NONCE:])
        try:
            with self._ring.lock:
                return bytes(self._key.decrypt(body, mechanism=Mechanism.AES_GCM,
                                               mechanism_param=GCMParams(nonce, bytes(context),
                                                                         128)))
        except PKCS11Error:
            raise KeyUnavailable(f"cannot unwrap data key with {self.key_id}: wrong key, "
                                 "context or corrupted wrapped key") from None


class Pkcs11Keyring(Keyring):
    """Master keys in the token ``token_label`` of the PKCS#11 module at ``module``."""

    def __init__(self, module: Path, token_label: str, pin_file: Path,
                 prefix: str = "sandbox-master") -> None:
        if not re.fullmatch(r"[A-Za-z0-9_.-]{1,40}", prefix):
            raise ValueError("PKCS#11 key label prefix must be 1-40 of [A-Za-z0-9_.-]")
        self.prefix = prefix
        self.lock = threading.Lock()
        self._session = open_session(module, token_label, pin_file)

    def _keys(self) -> list[tuple[int, str, Any]]:
        from pkcs11 import Attribute, ObjectClass
        pattern = re.compile(rf"^{re.escape(self.prefix)}-(\d{{4,}})$")
        found = []
        with self.lock:
            for obj in self._session.get_objects({Attribute.CLASS: ObjectClass.SECRET_KEY}):
                label = str(obj[Attribute.LABEL] or "")
                match = pattern.match(label)
                if match:
                    found.append((int(match.group(1)), label, obj))
        return sorted(found, key=lambda item: item[0])

    def key_ids(self) -> list[str]:
        return [f"pkcs11:{label}" for _gen, label, _obj in self._keys()]

    def provider(self, key_id: str) -> KeyProvider:
        for _gen, label, obj in self._keys():
            if f"pkcs11:{label}" == key_id:
                return _TokenKey(self, label, obj)
        raise KeyUnavailable(f"master key {key_id} is not in the PKCS#11 token")

    def create_next(self) -> KeyProvider:
        """A new key labelled with the next generation. Rotation calls this holding the
        keyring lock, so processes do not race; should two keys still end up with one
        label (a caller without the lock), the one made here is destroyed and the next
        generation tried, so a label never names two keys."""
        from pkcs11 import Attribute, KeyType
        for _attempt in range(10):
            keys = self._keys()
            label = f"{self.prefix}-{(keys[-1][0] + 1 if keys else 1):04d}"
            with self.lock:
                key = self._session.generate_key(
                    KeyType.AES, 256, label=label, store=True,
                    template={Attribute.EXTRACTABLE: False, Attribute.SENSITIVE: True})
            if sum(1 for _gen, other, _obj in self._keys() if other == label) == 1:
                return _TokenKey(self, label, key)
            with self.lock:
                key.destroy()
        raise KeyUnavailable("could not create a new master key in the PKCS#11 token: "
                             "other processes keep taking the next generation")

    def retire(self, key_id: str) -> None:
        provider = self.provider(key_id)
        assert isinstance(provider, _TokenKey)
        with self.lock:
            provider._key.destroy()

    def close(self) -> None:
        with self.lock:
            self._session.close()


def open_session(module: Path, token_label: str, pin_file: Path) -> Any:
    """A read-write session, logged in as the user, on the token ``token_label`` of the
    PKCS#11 module at ``module`` (the PIN is read from ``pin_file``). Used by the keyring
    and by the release signing key in the token; raises :class:`KeyUnavailable` without
    revealing the PIN."""
    try:
        import pkcs11
    except ImportError:
        raise KeyUnavailable("the pkcs11 key provider needs: pip install python-pkcs11") \
            from None
    try:
        pin = Path(pin_file).read_text().strip()
    except OSError as exc:
        raise KeyUnavailable(f"cannot read PKCS#11 PIN file {str(pin_file)!r}: "
                             f"{exc.strerror}") from None
    try:
        token = pkcs11.lib(str(module)).get_token(token_label=token_label)
        try:
            return token.open(user_pin=pin, rw=True)
        except pkcs11.exceptions.UserAlreadyLoggedIn:
            # PKCS#11 login belongs to the process: later sessions share it.
            return token.open(rw=True)
    except Exception as exc:
        raise KeyUnavailable(f"cannot open PKCS#11 token {token_label!r} with module "
                             f"{str(module)!r}: {type(exc).__name__}") from None
