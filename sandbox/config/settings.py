"""Settings read from the environment (``SANDBOX_*``) with safe defaults for one machine.

Everything the product keeps lives under ``home``: the SQLite database, the master key
file and the encrypted datasets. A PostgreSQL URL may replace the SQLite default.
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path
from typing import Literal

from pydantic import Field, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict


class Settings(BaseSettings):
    """Process settings. Values come from ``SANDBOX_<NAME>`` environment variables."""

    model_config = SettingsConfigDict(env_prefix="SANDBOX_", extra="ignore")

    home: Path = Field(default=Path(".sandbox-home"), description="Directory for DB, keys, data")
    database_url: str | None = Field(
        default=None, description="SQLAlchemy URL; default is SQLite at <home>/sandbox.db"
    )
    environment: Literal["dev", "prod"] = "dev"
    host: str = "127.0.0.1"
    port: int = 8765
    max_upload_bytes: int = 2 * 1024**3
    upload_spool_dir: Path | None = Field(
        default=None, description="ordinary-disk directory where uploads are spooled "
        "encrypted under a per-upload key held only in memory; default <home>/upload-spool")
    max_concurrent_uploads: int = Field(
        default=4, ge=1, description="uploads received or ingested at once per API process "
        "(503 with Retry-After beyond it)")
    max_concurrent_uploads_per_org: int = Field(
        default=2, ge=1, description="of those, how many one organisation may have at once "
        "(503 with Retry-After beyond it), so that one organisation cannot take every slot")
    upload_max_seconds: float = Field(
        default=7200.0, gt=0, description="longest time an upload body may take to arrive, "
        "whatever its rate (408); bounds how long one upload holds a slot. 2 hours: a "
        "2 GiB file at 300 kB/s (2.4 Mbit/s)")
    upload_idle_timeout_seconds: float = Field(
        default=30.0, gt=0, description="longest wait for the next piece of an upload body "
                                        "(408)")
    upload_min_bytes_per_second: int = Field(
        default=64 * 1024, ge=0, description="slowest average upload rate allowed once the "
        "grace period is over (408); 0 turns the check off")
    upload_rate_grace_seconds: float = Field(
        default=10.0, ge=0, description="time an upload may take before the minimum rate "
                                        "applies")
    max_request_bytes: int = Field(default=1024 * 1024,
                                   description="JSON request bodies (uploads have their own cap)")
    submissions_per_minute: int = Field(default=60, description="per organisation (429)")
    max_pending_jobs: int = Field(default=100, description="per organisation (429)")
    worker_poll_seconds: float = 0.2
    lease_seconds: float = 60.0
    max_attempts: int = 3
    key_provider: Literal["local", "pkcs11"] = "local"
    pkcs11_module: Path = Path("/usr/lib/softhsm/libsofthsm2.so")
    pkcs11_token_label: str = "sandbox"
    pkcs11_pin_file: Path | None = None
    decrypted_cache_bytes: int = Field(
        default=2 * 1024**3, description="Worker's in-memory cache of decrypted datasets"
    )
    runner_backend: Literal["bubblewrap", "docker", "stub"] = Field(
        default="bubblewrap", description="isolation for script jobs; 'stub' is for tests "
        "and refused when environment is prod")
    runner_root: Path = Field(default=Path("/var/lib/sandbox-runtime"),
                              description="world-readable runtime and per-job script dirs")
    runner_prestart: bool = Field(
        default=True, description="bubblewrap: keep one launcher (a shell already in a "
        "fresh cgroup, dropped to a fresh uid) started ahead for the next job; no sandbox "
        "is created before its job arrives")
    docker_image: str = "sandbox-runner:latest"
    docker_runtime: str | None = Field(default=None, description="e.g. runsc for gVisor")
    tmpfs_dir: Path = Field(
        default=Path("/dev/shm"), description="RAM-backed directory for transient plaintext"
    )

    @field_validator("home", "tmpfs_dir", "upload_spool_dir")
    @classmethod
    def _absolute(cls, value: Path | None) -> Path | None:
        return value.expanduser().resolve() if value is not None else None

    @property
    def effective_database_url(self) -> str:
        """The database URL in force: the configured one or SQLite inside ``home``."""
        if self.database_url:
            return self.database_url
        return f"sqlite:///{self.home / 'sandbox.db'}"

    @property
    def keys_dir(self) -> Path:
        """Where the local keyring keeps its 0600 master key files."""
        return self.home / "keys"

    @property
    def data_dir(self) -> Path:
        return self.home / "data"

    @property
    def effective_upload_spool_dir(self) -> Path:
        """Where uploads are spooled, encrypted: the configured directory or
        ``<home>/upload-spool`` (ordinary disk beside the data, not tmpfs)."""
        return self.upload_spool_dir or self.home / "upload-spool"


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    """The process-wide settings (cached; tests build their own ``Settings``)."""
    return Settings()
