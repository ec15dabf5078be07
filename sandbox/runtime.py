"""What every process needs at start-up: settings, the migrated database, the key provider.

``Runtime.open(settings)`` refuses to start without an initialised home (``sandbox init``):
no key file, no service (fail closed).
"""

from __future__ import annotations

from dataclasses import dataclass

from sandbox.config import Settings
from sandbox.datasets.cache import check_ram_filesystem
from sandbox.datasets.keyring import Keyring, LocalKeyring
from sandbox.db import Database
from sandbox.errors import Conflict
from sandbox.review.signing import Signer


class NotInitialised(Conflict):
    """The home directory has no master key or database yet."""


@dataclass
class Runtime:
    settings: Settings
    db: Database
    keys: Keyring
    signer: Signer

    @classmethod
    def open(cls, settings: Settings) -> Runtime:
        keys = open_keyring(settings)
        if not keys.key_ids():
            raise NotInitialised(f"no master key in {settings.keys_dir}; run 'sandbox init' "
                                 "first")
        check_ram_filesystem(settings.tmpfs_dir)
        db = Database(settings.effective_database_url)
        db.migrate()
        if db.is_sqlite:
            for suffix in ("", "-wal", "-shm"):
                path = settings.home / f"sandbox.db{suffix}"
                if path.exists():
                    path.chmod(0o600)
        return cls(settings=settings, db=db, keys=keys, signer=release_signer(settings))

    def close(self) -> None:
        self.db.dispose()
        self.signer.close()
        self.keys.close()


def open_keyring(settings: Settings) -> Keyring:
    """The keyring the settings name (local key files by default, or a PKCS#11 token)."""
    if settings.key_provider == "pkcs11":
        from sandbox.datasets.pkcs11 import Pkcs11Keyring
        if settings.pkcs11_pin_file is None:
            raise NotInitialised("SANDBOX_PKCS11_PIN_FILE must name the token's PIN file")
        return Pkcs11Keyring(settings.pkcs11_module, settings.pkcs11_token_label,
                             settings.pkcs11_pin_file)
    return LocalKeyring(settings.keys_dir)


def release_signer(settings: Settings) -> Signer:
    """The Ed25519 key that signs releases, created on first use: with the pkcs11 key
    provider a non-extractable key pair in the same token as the master keys (label
    ``sandbox-release-signing``), otherwise ``<keys_dir>/release-signing.key`` (0600)."""
    if settings.key_provider == "pkcs11":
        from sandbox.review.signing import TokenSigner
        if settings.pkcs11_pin_file is None:
            raise NotInitialised("SANDBOX_PKCS11_PIN_FILE must name the token's PIN file")
        return TokenSigner(settings.pkcs11_module, settings.pkcs11_token_label,
                           settings.pkcs11_pin_file)
    from sandbox.review.signing import FileSigner
    return FileSigner(settings.keys_dir / "release-signing.key")
