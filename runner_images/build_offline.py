"""Build the runner image without a registry (the path CI uses).

The root filesystem is assembled from this machine and streamed as a tar into
``docker import``; nothing is downloaded:

- Debian's ``/usr/bin/python3.11`` and its standard library ``/usr/lib/python3.11``
  (with Debian's precompiled ``__pycache__``; no ``config-3.11-*``, no ``site``/``dist``
  packages);
- the shared libraries that the interpreter, the stdlib's extension modules and every
  ``.so`` of the runtime need (``ldd``), the dynamic loader and ``/etc/ld.so.cache``;
- the runtime site-packages from ``ensure_runtime`` (the SDK and the allowed libraries)
  at ``/opt/sandbox``, with bytecode compiled here so that no job recompiles polars or
  numpy on a read-only filesystem;
- ``/etc/passwd`` and ``/etc/group`` (root and nobody 65534), the C.UTF-8 locale, the
  time-zone database, an empty ``/tmp`` (1777) and ``/job`` (the script's mount point).

No shell, no package manager, no setuid binaries. The image is checked (imports of the
SDK and every library as uid 65534 with no network and a read-only root) before it is
tagged ``sandbox-runner:<runtime_key()>`` and ``sandbox-runner:latest``. Idempotent: an
image with that tag built by this same recipe is reused (``--force`` rebuilds). Prints
the image id on stdout; progress goes to stderr.

Usage: ``.venv/bin/python runner_images/build_offline.py [--force] [--repository NAME]
[--keep N]`` (older offline builds beyond the ``N`` newest are removed; default 2).
"""

from __future__ import annotations

import argparse
import concurrent.futures
import fnmatch
import hashlib
import importlib._bootstrap_external as bootstrap_external
import io
import json
import os
import subprocess
import sys
import tarfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

PYTHON = Path("/usr/bin/python3.11")
STDLIB = Path("/usr/lib/python3.11")
RUNTIME_ROOT = Path("/var/lib/sandbox-runtime")
EXTRA_LIBS = ("libgcc_s.so.1",)  # dlopen()ed by glibc for thread cancellation/unwinding
EXTRA_TREES = (Path("/usr/lib/locale/C.utf8"), Path("/usr/share/zoneinfo"))
STDLIB_SKIP = ("config-3.11-*", "site-packages", "dist-packages", "test", "idlelib",
               "turtledemo", "ensurepip", "tkinter")  # top-level names (fnmatch)
PASSWD = ("root:x:0:0:root:/root:/usr/sbin/nologin\n"
          "nobody:x:65534:65534:nobody:/nonexistent:/usr/sbin/nologin\n")
GROUP = "root:x:0:\nnogroup:x:65534:\n"
ENV = {"PATH": "/usr/local/bin:/usr/bin:/bin", "HOME": "/tmp", "MPLCONFIGDIR": "/tmp",
       "LANG": "C.UTF-8"}
CHECK = ("import sys; sys.path[:0] = ['/opt/sandbox']; import os, numpy, polars, pyarrow, "
         "matplotlib, matplotlib.pyplot, PIL, sandbox.sdk, sandbox.sdk.bootstrap; "
         "assert os.getuid() == 65534, os.getuid(); "
         "print(numpy.__version__, polars.__version__, pyarrow.__version__)")


def log(message: str) -> None:
    print(f"build_offline: {message}", file=sys.stderr, flush=True)


@dataclass(frozen=True)
class Entry:
    kind: str  # "dir", "file", "link", "data"
    mode: int = 0o755
    source: Path | None = None  # for "file"
    target: str = ""  # for "link"
    data: bytes = b""  # for "data"
    mtime: int = 0


class RootFS:
    """The image's files by path inside the image (no leading slash)."""

    def __init__(self) -> None:
        self.entries: dict[str, Entry] = {}

    def _parents(self, name: str) -> None:
        parent = os.path.dirname(name)
        while parent and parent not in self.entries:
            self.entries[parent] = Entry("dir", 0o755)
            parent = os.path.dirname(parent)

    def dir(self, name: str, mode: int = 0o755) -> None:
        self._parents(name)
        self.entries[name] = Entry("dir", mode)

    def link(self, name: str, target: str) -> None:
        self._parents(name)
        self.entries[name] = Entry("link", target=target)

    def data(self, name: str, data: bytes, mode: int = 0o644, mtime: int = 0) -> None:
        self._parents(name)
        self.entries[name] = Entry("data", mode, data=data, mtime=mtime or int(time.time()))

    def file(self, name: str, source: Path) -> None:
        """A regular file (symlinks are followed); writable bits and setuid are dropped."""
        st = source.stat()
        mode = 0o755 if st.st_mode & 0o111 else 0o644
        self._parents(name)
        self.entries[name] = Entry("file", mode, source=source, mtime=int(st.st_mtime))

    def tree(self, name: str, source: Path, skip: tuple[str, ...] = ()) -> None:
        """Copy a directory; links inside the tree stay links, links out of it are
        followed, dangling ones are dropped."""
        real_root = source.resolve()
        self.dir(name)
        for directory, dirs, files in os.walk(source):
            rel = os.path.relpath(directory, source)
            base = name if rel == "." else f"{name}/{rel}"
            kept = []
            for child in sorted(dirs):
                path = Path(directory, child)
                if rel == "." and any(fnmatch.fnmatch(child, s) for s in skip):
                    continue
                if path.is_symlink():
                    self._add_link_or_file(f"{base}/{child}", path, real_root)
                else:
                    self.dir(f"{base}/{child}")
                    kept.append(child)
            dirs[:] = kept
            for child in sorted(files):
                path = Path(directory, child)
                if path.is_symlink():
                    self._add_link_or_file(f"{base}/{child}", path, real_root)
                elif path.is_file():
                    self.file(f"{base}/{child}", path)

    def _add_link_or_file(self, name: str, path: Path, real_root: Path) -> None:
        if not path.exists():
            return
        resolved = path.resolve()
        if resolved.is_relative_to(real_root) and not os.path.isabs(os.readlink(path)):
            self.link(name, os.readlink(path))
        elif resolved.is_file():
            self.file(name, resolved)

    def stream(self, out: IO[bytes]) -> tuple[int, int]:
        """Write the tar to ``out`` (a binary file object); returns (members, bytes)."""
        count = total = 0
        with tarfile.open(fileobj=out, mode="w|", format=tarfile.PAX_FORMAT) as tar:
            for name in sorted(self.entries):
                entry = self.entries[name]
                info = tarfile.TarInfo(name)
                info.uid = info.gid = 0
                info.uname = info.gname = "root"
                info.mode = entry.mode
                info.mtime = entry.mtime
                if entry.kind == "dir":
                    info.type = tarfile.DIRTYPE
                    tar.addfile(info)
                elif entry.kind == "link":
                    info.type = tarfile.SYMTYPE
                    info.linkname = entry.target
                    info.mode = 0o777
                    tar.addfile(info)
                elif entry.kind == "data":
                    info.size = len(entry.data)
                    tar.addfile(info, io.BytesIO(entry.data))
                    total += info.size
                else:
                    assert entry.source is not None
                    with open(entry.source, "rb") as handle:
                        info.size = os.fstat(handle.fileno()).st_size
                        tar.addfile(info, handle)
                    total += info.size
                count += 1
        return count, total


def _is_elf(path: Path) -> bool:
    try:
        with open(path, "rb") as handle:
            return handle.read(4) == b"\x7fELF"
    except OSError:
        return False


def shared_libraries(binaries: list[Path], inside: Path) -> tuple[set[str], list[str]]:
    """Host paths of the libraries ``binaries`` need (not those under ``inside``), and
    what ``ldd`` could not find."""
    needed: set[str] = set()
    missing: list[str] = []
    for start in range(0, len(binaries), 200):
        batch = [str(b) for b in binaries[start:start + 200]]
        result = subprocess.run(["ldd", *batch], capture_output=True, text=True,
                                env={"LC_ALL": "C", "PATH": "/usr/bin:/bin"})
        current = batch[0] if len(batch) == 1 else ""
        for line in result.stdout.splitlines():
            if not line.startswith(("\t", " ")):
                current = line.rstrip(":")
                continue
            line = line.strip()
            if "=> not found" in line:
                missing.append(f"{current}: {line.split()[0]}")
                continue
            if "=>" in line:
                path = line.split("=>", 1)[1].strip().split(" (")[0].strip()
            else:
                path = line.split(" (")[0].strip()
            if not path.startswith("/"):
                continue  # linux-vdso.so.1, "statically linked"
            if Path(path).resolve().is_relative_to(inside.resolve()):
                continue
            needed.add(path)
    return needed, missing


def _find_library(name: str) -> str | None:
    for directory in ("/usr/lib/x86_64-linux-gnu", "/lib/x86_64-linux-gnu",
                      "/usr/lib/aarch64-linux-gnu", "/usr/lib64", "/usr/lib"):
        if Path(directory, name).exists():
            return f"{directory}/{name}"
    return None


def image_path(host_path: str) -> str:
    """Where a host library goes in the image: its directory with symlinks resolved
    (merged /usr), its own name kept (the soname the loader looks for)."""
    directory = os.path.realpath(os.path.dirname(host_path))
    return f"{directory}/{os.path.basename(host_path)}".lstrip("/")


def _compile_one(job: tuple[str, str, int, int]) -> tuple[str, bytes] | None:
    source_path, in_image, mtime, size = job
    try:
        source = Path(source_path).read_bytes()
        code = compile(source, in_image, "exec", dont_inherit=True, optimize=0)
    except (SyntaxError, ValueError, OSError):
        return None  # left to fail (or not) at import time, as without bytecode
    pyc = bootstrap_external._code_to_timestamp_pyc(code, mtime, size)  # type: ignore[attr-defined]
    return in_image, bytes(pyc)


def compile_bytecode(fs: RootFS, prefix: str, magic_tag: str) -> int:
    """Add ``__pycache__/*.<magic_tag>.pyc`` for every ``.py`` under ``prefix``."""
    jobs = []
    for name, entry in fs.entries.items():
        if entry.kind == "file" and name.startswith(prefix) and name.endswith(".py"):
            assert entry.source is not None
            st = entry.source.stat()
            jobs.append((str(entry.source), "/" + name, int(st.st_mtime), st.st_size))
    workers = max(1, min(4, os.cpu_count() or 1))
    with concurrent.futures.ProcessPoolExecutor(workers) as pool:
        results = list(pool.map(_compile_one, jobs, chunksize=32))
    count = 0
    for result in results:
        if result is None:
            continue
        in_image, pyc = result
        directory, filename = os.path.split(in_image.lstrip("/"))
        stem = filename[:-3]
        fs.data(f"{directory}/__pycache__/{stem}.{magic_tag}.pyc", pyc, 0o644,
                mtime=int(time.time()))
        count += 1
    return count


def assemble(site: Path) -> RootFS:
    if not PYTHON.exists() or not (STDLIB / "os.py").exists():
        raise SystemExit(f"{PYTHON} and {STDLIB} are needed (apt-get install python3.11)")
    fs = RootFS()
    for name in ("usr/bin", "usr/lib", "usr/lib64", "etc", "opt", "proc", "sys", "dev",
                 "run"):
        fs.dir(name)
    fs.dir("tmp", 0o1777)
    fs.dir("job", 0o755)
    fs.dir("root", 0o700)
    for name in ("bin", "lib", "lib64", "sbin"):
        fs.link(name, f"usr/{name}")
    fs.dir("usr/sbin")
    fs.file("usr/bin/python3.11", PYTHON.resolve())
    fs.link("usr/bin/python3", "python3.11")
    fs.link("usr/bin/python", "python3.11")
    fs.tree(str(STDLIB).lstrip("/"), STDLIB, STDLIB_SKIP)
    fs.tree("opt/sandbox", site)
    for tree in EXTRA_TREES:
        if tree.is_dir():
            fs.tree(str(tree).lstrip("/"), tree, ("right",))
    binaries = [PYTHON.resolve()]
    binaries += sorted(p for p in (STDLIB / "lib-dynload").glob("*.so"))
    binaries += sorted(p for p in site.rglob("*.so*") if p.is_file() and _is_elf(p))
    libraries, missing = shared_libraries(binaries, site)
    for name in EXTRA_LIBS:
        found = _find_library(name)
        if found:
            libraries.add(found)
    for library in sorted(libraries):
        fs.file(image_path(library), Path(library))
    if missing:
        log(f"{len(missing)} libraries not found by ldd (left out): "
            + ", ".join(sorted(set(missing))[:10]))
    if Path("/etc/ld.so.cache").exists():
        fs.file("etc/ld.so.cache", Path("/etc/ld.so.cache"))
    fs.data("etc/passwd", PASSWD.encode())
    fs.data("etc/group", GROUP.encode())
    fs.data("etc/hostname", b"sandbox\n")
    log(f"{len(binaries)} ELF files -> {len(libraries)} host libraries")
    return fs


def recipe_hash() -> str:
    digest = hashlib.sha256(Path(__file__).read_bytes())
    st = PYTHON.stat() if PYTHON.exists() else None
    digest.update(f"{st.st_size if st else 0}:{int(st.st_mtime) if st else 0}".encode())
    return digest.hexdigest()[:16]


def docker(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["docker", *args], capture_output=True, text=True, check=check)


def existing(tag: str) -> dict[str, str] | None:
    """The labels and id of the image ``tag``, or None."""
    result = docker("image", "inspect", "--format", "{{.Id}} {{json .Config.Labels}}", tag,
                    check=False)
    if result.returncode != 0:
        return None
    ident, _, labels = result.stdout.strip().partition(" ")
    found: dict[str, str] = json.loads(labels) if labels and labels != "null" else {}
    return {"id": ident, **found}


def changes(key: str, recipe: str, boot: str) -> Iterator[str]:
    yield "USER 65534:65534"
    yield "WORKDIR /tmp"
    for name, value in ENV.items():
        yield f"ENV {name}={value}"
    yield "CMD " + json.dumps(["python3", "-I", "-S", "-c", boot, "/job/script.py"])
    yield f"LABEL org.sandbox.runtime-key={key} org.sandbox.recipe={recipe} " \
          "org.sandbox.build=offline"


def verify(image: str) -> str:
    result = docker("run", "--rm", "--network", "none", "--read-only", "--cap-drop", "ALL",
                    "--security-opt", "no-new-privileges", "--user", "65534:65534",
                    "--tmpfs", "/tmp:size=64m,mode=1777", image, "python3", "-I", "-S", "-c",
                    CHECK, check=False)
    if result.returncode != 0:
        raise SystemExit(f"the new image failed its check:\n{result.stdout}{result.stderr}")
    return result.stdout.strip()


def build(repository: str, force: bool, keep: int = 2) -> str:
    from sandbox.runner.launcher import BOOT
    from sandbox.runner.runtime import ensure_runtime, runtime_key

    key, recipe = runtime_key(), recipe_hash()
    tag, latest = f"{repository}:{key}", f"{repository}:latest"
    found = existing(tag)
    if found and found.get("org.sandbox.recipe") == recipe and not force:
        docker("tag", tag, latest)
        log(f"{tag} is up to date ({found['id'][:19]}); tagged {latest}")
        return found["id"]
    started = time.monotonic()
    site = ensure_runtime(RUNTIME_ROOT)
    log(f"runtime {site} ready in {time.monotonic() - started:.1f}s")
    fs = assemble(site)
    magic_tag = subprocess.run([str(PYTHON), "-I", "-S", "-c",
                                "import sys; print(sys.implementation.cache_tag)"],
                               capture_output=True, text=True, check=True).stdout.strip()
    compiled = compile_bytecode(fs, "opt/sandbox/", magic_tag)
    log(f"compiled {compiled} modules to bytecode ({magic_tag}) at "
        f"{time.monotonic() - started:.1f}s")
    argv = ["docker", "import", "--message", f"sandbox runner, runtime {key} (offline)"]
    for change in changes(key, recipe, BOOT):
        argv += ["--change", change]
    argv += ["-"]
    proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE)
    assert proc.stdin is not None
    try:
        members, size = fs.stream(proc.stdin)
    except BrokenPipeError:  # docker import gave up; its stderr says why
        members = size = 0
    out, err = proc.communicate()
    if proc.returncode != 0:
        raise SystemExit(f"docker import failed: {err.decode(errors='replace').strip()}")
    image = out.decode().strip().splitlines()[-1]
    log(f"imported {members} files, {size / 1e6:.0f} MB as {image[:19]} at "
        f"{time.monotonic() - started:.1f}s")
    versions = verify(image)
    docker("tag", image, tag)
    docker("tag", image, latest)
    log(f"checked ({versions}); tagged {tag} and {latest} in "
        f"{time.monotonic() - started:.1f}s")
    prune(repository, keep)
    return image


def prune(repository: str, keep: int) -> None:
    """Drop all but the ``keep`` newest offline builds of ``repository`` (each is a
    half-gigabyte; an image still used by a container stays)."""
    listed = docker("image", "ls", repository, "--filter", "label=org.sandbox.build=offline",
                    "--format", "{{.Tag}} {{.ID}}", check=False).stdout.split("\n")
    seen: list[str] = []
    for line in listed:  # newest first
        tag, _, ident = line.strip().partition(" ")
        if not tag or tag in ("latest", "<none>"):
            continue
        if ident not in seen:
            seen.append(ident)
        if seen.index(ident) >= keep:
            result = docker("rmi", f"{repository}:{tag}", check=False)
            if result.returncode == 0:
                log(f"removed the old build {repository}:{tag}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else "")
    parser.add_argument("--force", action="store_true", help="rebuild even if up to date")
    parser.add_argument("--repository", default="sandbox-runner")
    parser.add_argument("--keep", type=int, default=2,
                        help="offline builds kept (the new one included); older ones removed")
    args = parser.parse_args(argv)
    if os.geteuid() != 0 and not os.access(RUNTIME_ROOT.parent, os.W_OK) \
            and not RUNTIME_ROOT.exists():
        raise SystemExit(f"{RUNTIME_ROOT} cannot be created: run as root")
    print(build(args.repository, args.force, max(1, args.keep)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
