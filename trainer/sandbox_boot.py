"""The sandbox's first process inside its namespaces (trainer/sandbox.py runs it under `unshare` as the namespace's
root): make every mount read-only except the work directory, give the pid namespace its own /proc, then exec the
code through `setpriv` with every capability dropped, so nothing it runs can remount, mount or unmount.

    python -I -S sandbox_boot.py WORK_DIR SETPRIV PYTHON PID_MAX     (runs PYTHON -I main.py in WORK_DIR)

Standard library only, no imports from the package: it runs before anything else in the sandbox. Exit status 97
means the mounts could not be made read-only (the caller then treats namespaces as unavailable).
"""

import ctypes
import os
import sys

MS_RDONLY, MS_NOSUID, MS_NODEV, MS_NOEXEC = 1, 2, 4, 8
MS_REMOUNT, MS_NOATIME, MS_NODIRATIME, MS_BIND, MS_REC = 32, 1024, 2048, 4096, 16384
MS_PRIVATE, MS_RELATIME, MS_STRICTATIME = 1 << 18, 1 << 21, 1 << 24
KEEP = {"nosuid": MS_NOSUID, "nodev": MS_NODEV, "noexec": MS_NOEXEC, "noatime": MS_NOATIME,
        "nodiratime": MS_NODIRATIME, "relatime": MS_RELATIME, "strictatime": MS_STRICTATIME}

libc = ctypes.CDLL(None, use_errno=True)
libc.mount.argtypes = [ctypes.c_char_p, ctypes.c_char_p, ctypes.c_char_p, ctypes.c_ulong, ctypes.c_void_p]


def mount(source, target, fstype, flags):
    if libc.mount(source and source.encode(), target.encode(), fstype and fstype.encode(), flags, None) != 0:
        raise OSError(ctypes.get_errno(), f"mount {target}: {os.strerror(ctypes.get_errno())}")


def mounts():
    """(mount point, per-mount options) of this mount namespace, parents before children."""
    out = []
    with open("/proc/self/mountinfo") as f:
        for line in f:
            fields = line.split()
            point = fields[4].encode().decode("unicode_escape")  # octal escapes such as \\040
            out.append((point, fields[5].split(",")))
    return out


def main():
    work, setpriv, python, pid_max = sys.argv[1:5]
    mount(None, "/", None, MS_REC | MS_PRIVATE)
    mount(work, work, None, MS_BIND)  # its own mount: stays writable
    try:
        mount("proc", "/proc", "proc", MS_NOSUID | MS_NODEV | MS_NOEXEC)  # this pid namespace's processes only
    except OSError:
        pass  # a /proc the kernel will not replace (masked paths): the old one shows, read-only
    try:  # Linux >= 6.14: pid_max is per pid namespace; it bounds the processes here even for real root, whom the
        # kernel exempts from RLIMIT_NPROC (the kernel's least value, 301, allows about 300)
        with open("/proc/sys/kernel/pid_max", "w") as f:
            f.write(pid_max)
    except OSError:
        pass  # an older kernel: RLIMIT_NPROC (not for root) and the timeout bound a fork bomb
    failed = []
    for point, options in mounts():
        if point == work or "ro" in options:
            continue
        flags = MS_REMOUNT | MS_BIND | MS_RDONLY
        for name in options:
            flags |= KEEP.get(name, 0)
        try:
            mount(None, point, None, flags)
        except OSError as e:
            failed.append((point, e))
    kernel = ("/proc", "/sys", "/dev/pts", "/dev/mqueue")  # pseudo file systems: nothing to write there as nobody
    critical = [(point, e) for point, e in failed if not point.startswith(kernel)]
    if critical:
        print(f"sandbox: could not make mounts read-only: {critical[:3]}", file=sys.stderr)
        sys.exit(97)
    os.chdir(work)
    os.execv(setpriv, [setpriv, "--bounding-set=-all", "--inh-caps=-all", "--no-new-privs", "--",
                       python, "-I", "main.py"])


if __name__ == "__main__":
    main()
