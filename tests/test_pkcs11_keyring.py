"""The PKCS#11 keyring against a real SoftHSM2 token (Debian's softhsm2)."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest
from conftest import QUERY, Api, Home, missing_part

from sandbox.cli.home import initialise
from sandbox.config import Settings
from sandbox.datasets.keys import KeyUnavailable
from sandbox.datasets.lifecycle import rotate_master_key
from sandbox.runtime import Runtime

MODULE = Path("/usr/lib/softhsm/libsofthsm2.so")


@pytest.fixture
def token(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> tuple[str, Path]:
    if not MODULE.exists() or shutil.which("softhsm2-util") is None:
        missing_part("SoftHSM2 (apt-get install softhsm2)")
    try:
        import pkcs11  # noqa: F401
    except ImportError:
        missing_part("python-pkcs11")
    tokens = tmp_path / "tokens"
    tokens.mkdir()
    conf = tmp_path / "softhsm2.conf"
    conf.write_text(f"directories.tokendir = {tokens}\nobjectstore.backend = file\n"
                    "log.level = ERROR\n")
    monkeypatch.setenv("SOFTHSM2_CONF", str(conf))
    pin_file = tmp_path / "pin"
    pin_file.write_text("246810\n")
    pin_file.chmod(0o600)
    subprocess.run(["softhsm2-util", "--init-token", "--free", "--label", "sbx-test",
                    "--so-pin", "13579", "--pin", "246810"], check=True, capture_output=True)
    return "sbx-test", pin_file


def test_wrap_unwrap_rotate_retire(token: tuple[str, Path]) -> None:
    from sandbox.datasets.pkcs11 import Pkcs11Keyring
    label, pin_file = token
    ring = Pkcs11Keyring(MODULE, label, pin_file)
    assert ring.key_ids() == []
    first = ring.create_next()
    blob = first.wrap(b"k" * 32, context=b"ctx")
    assert b"k" * 32 not in blob
    assert ring.provider(first.key_id).unwrap(blob, context=b"ctx") == b"k" * 32
    with pytest.raises(KeyUnavailable):
        first.unwrap(blob, context=b"other")
    second = ring.create_next()
    assert ring.current().key_id == second.key_id
    with pytest.raises(KeyUnavailable):
        second.unwrap(blob, context=b"ctx")
    ring.retire(first.key_id)
    with pytest.raises(KeyUnavailable):
        ring.provider(first.key_id)
    ring.close()


def test_two_keys_never_share_a_label(token: tuple[str, Path],
                                      monkeypatch: pytest.MonkeyPatch) -> None:
    """A creator that listed the token before another process added the next generation
    makes a key with that label too; it must destroy its own and take the next one."""
    from sandbox.datasets.pkcs11 import Pkcs11Keyring
    label, pin_file = token
    ring = Pkcs11Keyring(MODULE, label, pin_file)
    # (the library, and so the token, can be shared with earlier tests of this process)
    before = set(ring.key_ids())
    first = ring.create_next()
    other = Pkcs11Keyring(MODULE, label, pin_file)  # "another process"
    real = Pkcs11Keyring._keys
    stale = [real(ring)]  # the listing taken before the other process's key appeared
    second = other.create_next()

    def listing(self: Pkcs11Keyring):  # type: ignore[no-untyped-def]
        return stale.pop() if stale else real(self)

    monkeypatch.setattr(Pkcs11Keyring, "_keys", listing)  # stale once, then real
    try:
        third = ring.create_next()
        ids = ring.key_ids()
        assert len(ids) == len(set(ids))  # no label names two keys
        assert set(ids) - before == {first.key_id, second.key_id, third.key_id}
        assert ring.current().key_id == third.key_id != second.key_id
        blob = second.wrap(b"s" * 32, context=b"c")
        assert ring.provider(second.key_id).unwrap(blob, context=b"c") == b"s" * 32
    finally:
        for key_id in set(ring.key_ids()) - before:
            ring.retire(key_id)
        ring.close()
        other.close()


def test_wrong_pin_is_refused_without_leaking_it(token: tuple[str, Path],
                                                 tmp_path: Path) -> None:
    from sandbox.datasets.pkcs11 import Pkcs11Keyring
    label, _ = token
    bad = tmp_path / "bad-pin"
    bad.write_text("000000")
    with pytest.raises(KeyUnavailable) as err:
        Pkcs11Keyring(MODULE, label, bad)
    assert "000000" not in str(err.value)


def test_story_with_keys_in_the_token(token: tuple[str, Path], tmp_path: Path,
                                      demo_files) -> None:
    label, pin_file = token
    settings = Settings(home=tmp_path / "home", key_provider="pkcs11",
                        pkcs11_token_label=label, pkcs11_pin_file=pin_file)
    tokens = initialise(settings).tokens
    home = Home(settings, Runtime.open(settings), tokens)
    try:
        assert not list((tmp_path / "home").rglob("master-*.key"))  # master keys: in the token
        api = Api(home)
        api.register(demo_files)
        api.approve_policy()
        rotation = rotate_master_key(home.runtime.db, home.runtime.keys, retire_old=True)
        assert rotation.rewrapped == 1 and len(rotation.retired) == 1
        job = api.as_("analyst").post("/v1/jobs", json={"query": QUERY}).json()
        assert home.worker().run_once()
        status = api.as_("analyst").get(f"/v1/jobs/{job['id']}").json()
        assert status["status"] == "pending_review", status
    finally:
        home.runtime.close()
        os.environ.pop("SOFTHSM2_CONF", None)
