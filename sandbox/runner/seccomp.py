"""A seccomp-BPF filter for the sandbox (x86-64), built without libseccomp.

Default allow; the syscalls an escape or a host attack needs are refused with EPERM
(``ptrace``, ``mount`` and the new mount API, ``unshare``, ``setns``, ``keyctl`` and key
syscalls, ``bpf``, ``perf_event_open``, module and kexec loading, ``userfaultfd``,
``process_vm_*``, ``io_uring``, ``ioctl(TIOCSTI/TIOCLINUX)`` ...). ``clone3`` answers
ENOSYS so the C library falls back to ``clone``; x32 and foreign-architecture calls are
killed. bubblewrap installs the program (``--seccomp FD``) just before it runs Python.
"""

from __future__ import annotations

import errno
import platform
import struct

_LD_W_ABS, _JEQ_K, _JGE_K, _RET_K = 0x20, 0x15, 0x35, 0x06
_RET_ALLOW, _RET_KILL = 0x7FFF0000, 0x80000000
_RET_ERRNO = 0x00050000
_AUDIT_ARCH_X86_64 = 0xC000003E

DENIED = {
    "ptrace": 101, "syslog": 103, "personality": 135, "pivot_root": 155, "acct": 163,
    "chroot": 161, "mount": 165, "umount2": 166, "swapon": 167, "swapoff": 168,
    "reboot": 169, "iopl": 172, "ioperm": 173, "init_module": 175, "delete_module": 176,
    "quotactl": 179, "lookup_dcookie": 212, "kexec_load": 246, "add_key": 248,
    "request_key": 249, "keyctl": 250, "unshare": 272, "perf_event_open": 298,
    "name_to_handle_at": 303, "open_by_handle_at": 304, "setns": 308,
    "process_vm_readv": 310, "process_vm_writev": 311, "finit_module": 313,
    "kexec_file_load": 320, "bpf": 321, "userfaultfd": 323, "io_uring_setup": 425,
    "io_uring_enter": 426, "io_uring_register": 427, "open_tree": 428, "move_mount": 429,
    "fsopen": 430, "fsconfig": 431, "fsmount": 432, "fspick": 433, "mount_setattr": 442,
}
_IOCTL, _CLONE3 = 16, 435
_DENIED_IOCTLS = (0x5412, 0x541C)  # TIOCSTI, TIOCLINUX


def _insn(code: int, jt: int, jf: int, k: int) -> bytes:
    return struct.pack("<HBBI", code, jt, jf, k)


def program() -> bytes:
    """The BPF program as bytes (``struct sock_filter[]``), for ``bwrap --seccomp``."""
    if platform.machine() != "x86_64":
        raise RuntimeError("the seccomp filter is written for x86-64")
    eperm = _RET_ERRNO | errno.EPERM
    out = [
        _insn(_LD_W_ABS, 0, 0, 4),  # arch
        _insn(_JEQ_K, 1, 0, _AUDIT_ARCH_X86_64),
        _insn(_RET_K, 0, 0, _RET_KILL),
        _insn(_LD_W_ABS, 0, 0, 0),  # syscall number
        _insn(_JGE_K, 0, 1, 0x40000000),  # x32 ABI
        _insn(_RET_K, 0, 0, _RET_KILL),
        _insn(_JEQ_K, 0, 1, _CLONE3),
        _insn(_RET_K, 0, 0, _RET_ERRNO | errno.ENOSYS),
    ]
    for number in sorted(DENIED.values()):
        out += [_insn(_JEQ_K, 0, 1, number), _insn(_RET_K, 0, 0, eperm)]
    # ioctl: refuse the terminal-injection requests (low 32 bits of the second argument)
    out.append(_insn(_JEQ_K, 0, 1 + 2 * len(_DENIED_IOCTLS), _IOCTL))
    out.append(_insn(_LD_W_ABS, 0, 0, 24))
    for request in _DENIED_IOCTLS:
        out += [_insn(_JEQ_K, 0, 1, request), _insn(_RET_K, 0, 0, eperm)]
    out.append(_insn(_RET_K, 0, 0, _RET_ALLOW))
    return b"".join(out)
