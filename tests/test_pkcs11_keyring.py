"""The PKCS#11 keyring against a real SoftHSM2 token (Debian's softhsm2)."""

from __future__ import annotations

import hashlib
import os
import secrets
import shutil
import subprocess
from pathlib import Path

import pytest
from conftest import QUERY, Api, Home, missing_part

from sandbox.cli.home import initialise
from sandbox.config import Settings
from sandbox.datasets.keys import KeyUnavailable
from sandbox.datasets.lifecycle import rotate_master_key
from sandbox.review.signing import ReleaseInvalid, canonical, verify
from sandbox.runtime import Runtime, release_signer

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
        assert api.as_("reviewer").post(f"/v1/reviews/{job['id']}/approve").status_code == 200
        artifact = api.as_("analyst").get(f"/v1/releases/{job['id']}").json()
        public = api.as_("analyst").get("/v1/releases/public-key").json()
        assert verify(artifact, public["pem"])["job_id"] == job["id"]
        assert public["key_id"] == home.runtime.signer.key_id == artifact["key_id"]
        assert not list((tmp_path / "home").rglob("release-signing.key"))  # in the token
    finally:
        home.runtime.signer.close()
        home.runtime.close()
        _destroy_labelled(label, pin_file, "sandbox-release-signing")
        os.environ.pop("SOFTHSM2_CONF", None)


def _destroy_labelled(token_label: str, pin_file: Path, label: str) -> int:
    """Destroy every object labelled ``label`` in the (process-shared) test token."""
    from pkcs11 import Attribute

    from sandbox.datasets.pkcs11 import open_session
    session = open_session(MODULE, token_label, pin_file)
    try:
        objects = list(session.get_objects({Attribute.LABEL: label}))
        for obj in objects:
            obj.destroy()
        return len(objects)
    finally:
        session.close()


def _payload(rows: list[int]) -> dict[str, object]:
    content = {"rows": rows}
    return {"job_id": "j-1", "content": content,
            "sha256": hashlib.sha256(canonical(content)).hexdigest()}


def test_release_signing_key_in_the_token(token: tuple[str, Path]) -> None:
    from pkcs11 import Attribute
    from pkcs11.exceptions import AttributeSensitive

    from sandbox.review.signing import TokenSigner
    label, pin_file = token
    key_label = f"sbx-test-sign-{secrets.token_hex(4)}"
    signer = TokenSigner(MODULE, label, pin_file, label=key_label)
    again = None
    try:
        artifact = signer.sign(_payload([1, 2]))
        assert set(artifact) == {"payload", "signature", "key_id", "algorithm"}
        assert artifact["algorithm"] == "Ed25519" and artifact["key_id"] == signer.key_id
        assert verify(artifact, signer.public_pem())["content"] == {"rows": [1, 2]}
        tampered = {**artifact, "payload": _payload([1, 3])}
        with pytest.raises(ReleaseInvalid, match="altered"):
            verify(tampered, signer.public_pem())
        private = signer._private
        assert private[Attribute.SENSITIVE] is True
        assert private[Attribute.EXTRACTABLE] is False
        with pytest.raises(AttributeSensitive):
            private[Attribute.VALUE]
        again = TokenSigner(MODULE, label, pin_file, label=key_label)  # found, not created
        assert again.key_id == signer.key_id
        assert verify(again.sign(_payload([5])), signer.public_pem())
    finally:
        signer.close()
        if again is not None:
            again.close()
        assert _destroy_labelled(label, pin_file, key_label) == 2  # one pair, not two


def test_two_signing_keys_under_one_label_are_refused(token: tuple[str, Path]) -> None:
    from pkcs11 import Attribute, KeyType, Mechanism

    from sandbox.datasets.pkcs11 import open_session
    from sandbox.review.signing import TokenSigner
    label, pin_file = token
    key_label = f"sbx-test-sign-{secrets.token_hex(4)}"
    TokenSigner(MODULE, label, pin_file, label=key_label).close()
    session = open_session(MODULE, label, pin_file)
    try:
        params = session.create_domain_parameters(
            KeyType.EC_EDWARDS, {Attribute.EC_PARAMS: bytes.fromhex("06032b6570")}, local=True)
        params.generate_keypair(mechanism=Mechanism.EC_EDWARDS_KEY_PAIR_GEN, store=True,
                                label=key_label, id=b"other")
        with pytest.raises(KeyUnavailable, match="2 keys in the PKCS#11 token are labelled"):
            TokenSigner(MODULE, label, pin_file, label=key_label)
    finally:
        session.close()
        _destroy_labelled(label, pin_file, key_label)


def test_signing_key_created_at_the_same_moment_is_not_doubled(
        token: tuple[str, Path], monkeypatch: pytest.MonkeyPatch) -> None:
    """A process that listed the token before another created the key creates one too;
    it must destroy its own and use the other's, leaving one pair under the label."""
    from sandbox.review.signing import TokenSigner
    label, pin_file = token
    key_label = f"sbx-test-sign-{secrets.token_hex(4)}"
    first = TokenSigner(MODULE, label, pin_file, label=key_label)
    real = TokenSigner._pairs
    stale: list[list[tuple[bytes, object, object]]] = [[]]  # the listing before `first`

    def listing(self: TokenSigner) -> list[tuple[bytes, object, object]]:
        return stale.pop() if stale else real(self)

    monkeypatch.setattr(TokenSigner, "_pairs", listing)
    second = TokenSigner(MODULE, label, pin_file, label=key_label)
    try:
        assert second.key_id == first.key_id
    finally:
        first.close()
        second.close()
        assert _destroy_labelled(label, pin_file, key_label) == 2  # one pair


def test_release_signer_follows_the_key_provider(token: tuple[str, Path],
                                                 tmp_path: Path) -> None:
    from sandbox.review.signing import FileSigner, TokenSigner
    label, pin_file = token
    settings = Settings(home=tmp_path / "home", key_provider="pkcs11",
                        pkcs11_token_label=label, pkcs11_pin_file=pin_file)
    signer = release_signer(settings)
    try:
        assert isinstance(signer, TokenSigner)
        assert verify(signer.sign(_payload([7])), signer.public_pem())
        assert not (settings.keys_dir / "release-signing.key").exists()
    finally:
        signer.close()
        _destroy_labelled(label, pin_file, "sandbox-release-signing")
    local = release_signer(Settings(home=tmp_path / "local"))
    assert isinstance(local, FileSigner)
    assert (tmp_path / "local" / "keys" / "release-signing.key").stat().st_mode & 0o777 == 0o600
