"""The sandbox's driver: the program that runs INSIDE the sandbox (launcher and worker).

A script, never imported by grpo_jax: runner.py reads this file's text once and writes it as
driver.py into each run's fresh temp directory, then starts `python -I -S driver.py
<result fd> <payload.json>` there, so nothing of the repository needs to be visible inside
the sandbox. It must keep working under `-I -S`: the standard library only, no grpo_jax
imports. See grpo_jax/rewards/sandbox/__init__.py for what the launcher and the worker do.
"""

import json, os, select, sys

AF_UNIX = 1
MS_NOSUID, MS_NODEV, MS_BIND, MS_REC = 2, 4, 4096, 16384


def _libc():
    import ctypes
    return ctypes, ctypes.CDLL(None, use_errno=True)


def _check(ctypes, rc, what):
    if rc != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"{what}: {os.strerror(err)}")


def _mounts(cfg):
    ctypes, libc = _libc()
    enc = lambda s: None if s is None else s.encode()

    def mount(src, target, fstype, flags, data=None):
        _check(ctypes, libc.mount(enc(src), enc(target), enc(fstype), ctypes.c_ulong(flags),
                                  enc(data)), "mount " + target)

    keep_fds = {k: os.open(k, os.O_PATH | os.O_DIRECTORY) for k in cfg["keep"]}
    for hidden in cfg["hide"]:
        if not os.path.isdir(hidden):
            continue
        mount("tmpfs", hidden, "tmpfs", MS_NOSUID | MS_NODEV, "mode=755,size=1m")
        for keep, fd in keep_fds.items():
            if keep == hidden or keep.startswith(hidden.rstrip("/") + "/"):
                os.makedirs(keep, exist_ok=True)
                mount(f"/proc/self/fd/{fd}", keep, None, MS_BIND | MS_REC)
    workdir = cfg["workdir"]
    os.makedirs(workdir, exist_ok=True)
    # Everything read-only and nosuid, recursively: mount_setattr(AT_FDCWD, "/",
    # AT_RECURSIVE, {attr_set: MOUNT_ATTR_RDONLY | MOUNT_ATTR_NOSUID}).
    attr = (ctypes.c_uint64 * 4)(1 | 2, 0, 0, 0)
    libc.syscall.restype = ctypes.c_long
    _check(ctypes, libc.syscall(ctypes.c_long(442), ctypes.c_int(-100), b"/",
                                ctypes.c_uint(0x8000), attr, ctypes.c_size_t(32)),
           "mount_setattr /")
    owner = f",uid={cfg['uid']},gid={cfg['uid']}" if cfg["mode"] == "root" else ""
    mount("tmpfs", workdir, "tmpfs", MS_NOSUID | MS_NODEV,
          f"mode=700,size={cfg['limits']['workdir_bytes']}{owner}")


def _drop_capabilities():
    ctypes, libc = _libc()
    # SECBIT_NOROOT | NO_SETUID_FIXUP | KEEP_CAPS_LOCKED and their locks: exec as uid 0
    # grants nothing.
    _check(ctypes, libc.prctl(28, 0x2f, 0, 0, 0), "PR_SET_SECUREBITS")
    for cap in range(64):
        libc.prctl(24, cap, 0, 0, 0)  # PR_CAPBSET_DROP; EINVAL past the last capability
    libc.prctl(47, 4, 0, 0, 0)  # PR_CAP_AMBIENT_CLEAR_ALL
    header = (ctypes.c_uint32 * 2)(0x20080522, 0)
    data = (ctypes.c_uint32 * 6)()
    _check(ctypes, libc.capset(header, data), "capset")


def _no_new_privs():
    try:
        ctypes, libc = _libc()
        libc.prctl(38, 1, 0, 0, 0)
    except Exception:
        pass


def _worker(cfg, payload, out_fd):
    import resource
    devnull = os.open(os.devnull, os.O_RDWR)
    os.dup2(devnull, 0)
    os.close(devnull)
    send = lambda line: os.write(out_fd, (line + "\n").encode())
    os.chdir(cfg["workdir"])
    lim = cfg["limits"]
    for which, soft, hard in ((resource.RLIMIT_CORE, 0, 0),
                              (resource.RLIMIT_CPU, lim["cpu_seconds"], lim["cpu_seconds"] + 1),
                              (resource.RLIMIT_AS, lim["memory_bytes"], lim["memory_bytes"]),
                              (resource.RLIMIT_FSIZE, lim["file_bytes"], lim["file_bytes"]),
                              (resource.RLIMIT_NOFILE, 64, 64),
                              (resource.RLIMIT_NPROC, cfg["nproc"], cfg["nproc"])):
        resource.setrlimit(which, (soft, hard))
    mode = cfg["mode"]
    if mode == "root":
        os.setgroups([])
        os.setgid(cfg["uid"])
        os.setuid(cfg["uid"])
    elif mode == "userns":
        _drop_capabilities()
    _no_new_privs()
    me = os.getpid()

    def flag(kind):
        try:
            send("F " + kind)
        except OSError:
            pass

    def descendant(pid):
        for _ in range(256):
            if pid == me:
                return True
            if pid <= 1:
                return False
            try:
                with open(f"/proc/{pid}/stat") as f:
                    pid = int(f.read().rsplit(")", 1)[1].split()[1])
            except (OSError, ValueError, IndexError):
                return False
        return False

    network = {"socket.connect", "socket.sendto", "socket.sendmsg", "socket.getaddrinfo",
               "socket.gethostbyname", "socket.gethostbyname_ex", "socket.gethostbyaddr",
               "socket.getnameinfo"}
    forbidden = set()
    if mode == "none":
        forbidden = {"os.fork", "os.forkpty", "os.system", "os.exec", "os.posix_spawn",
                     "os.spawn", "subprocess.Popen", "ctypes.dlopen", "ctypes.dlsym",
                     "ctypes.call_function", "ctypes.cdata", "ctypes.cdata/buffer"}

    def refuse(kind, event):
        flag(kind)
        raise PermissionError(f"sandbox: {event} is not allowed")

    def hook(event, args):
        if event in network:
            refuse("blocked network", event)
        elif event == "socket.__new__":
            if len(args) > 1 and args[1] not in (-1, AF_UNIX):
                refuse("blocked network", event)
        elif event == "os.kill":
            if not (args[0] > 0 and descendant(args[0])):
                refuse("blocked signal", event)
        elif event == "os.killpg":
            refuse("blocked signal", event)
        elif event in forbidden:
            refuse("forbidden call", event)

    sys.addaudithook(hook)

    def note(error):
        if isinstance(error, MemoryError):
            flag("memory limit")
        elif isinstance(error, BlockingIOError):
            flag("process limit")
        elif isinstance(error, OSError) and error.errno == 27:  # EFBIG (SIGXFSZ is ignored)
            flag("file limit")

    def leave_if_forked():
        if os.getpid() != me:
            try:
                sys.stdout.flush()
                sys.stderr.flush()
            finally:
                os._exit(0)

    namespace = {"__name__": "__main__", "__builtins__": __builtins__}
    sys.argv = ["solution.py"]
    try:
        exec(compile(payload["code"], "solution.py", "exec"), namespace)
    except BaseException as error:
        leave_if_forked()
        note(error)
    leave_if_forked()
    passed = 0
    for i, test in enumerate(payload["tests"]):
        try:
            exec(compile(test, f"<test {i}>", "exec"), namespace)
            passed += 1
        except BaseException as error:
            leave_if_forked()
            note(error)
        leave_if_forked()
    try:
        sys.stdout.flush()
        sys.stderr.flush()
    except BaseException:
        pass
    send(f"R {passed} {len(payload['tests'])}")


def main():
    result_fd = int(sys.argv[1])
    with open(sys.argv[2]) as f:
        payload = json.load(f)
    os.unlink(sys.argv[2])
    cfg = payload["config"]
    setup_error = None
    if cfg["mounts"]:
        try:
            _mounts(cfg)
        except Exception as error:
            setup_error = repr(error)
    else:
        os.chdir(cfg["workdir"])
    reader, writer = os.pipe()
    worker = os.fork()
    if worker == 0:
        try:
            os.close(reader)
            os.close(result_fd)
            if setup_error is None:
                _worker(cfg, payload, writer)
        except BaseException as error:
            try:
                os.write(writer, ("E " + repr(error).replace("\n", " ") + "\n").encode())
                sys.stderr.write(f"sandbox worker: {error!r}\n")
                sys.stderr.flush()
            except BaseException:
                pass
        os._exit(0)
    os.close(writer)
    try:
        ctypes, libc = _libc()
        libc.prctl(4, 0, 0, 0, 0)  # PR_SET_DUMPABLE 0: no /proc/<pid>/{mem,fd} for others
    except Exception:
        pass
    nonce = sys.stdin.readline().strip()
    os.set_blocking(reader, False)
    data, status, cpu = bytearray(), None, 0.0

    def drain():
        while True:
            try:
                chunk = os.read(reader, 65536)
            except BlockingIOError:
                return
            if not chunk:
                return
            if len(data) < 2**20:
                data.extend(chunk)

    while status is None:
        select.select([reader], [], [], 0.05)
        drain()
        while True:  # reap the worker and any orphan re-parented to us (pid 1)
            try:
                pid, st, usage = os.wait4(-1, os.WNOHANG)
            except ChildProcessError:
                pid = 0
            if pid == 0:
                break
            if pid == worker:
                status, cpu = st, usage.ru_utime + usage.ru_stime
    drain()
    flags, passed, total, error = [], None, None, setup_error
    for line in bytes(data).decode("utf-8", "replace").splitlines():
        parts = line.split()
        if len(parts) >= 2 and parts[0] == "F" and len(flags) < 64:
            flags.append(line[2:][:40])
        elif len(parts) == 3 and parts[0] == "R" and parts[1].isdigit() and parts[2].isdigit():
            passed, total = int(parts[1]), int(parts[2])  # the last one: the driver's
        elif parts[:1] == ["E"] and error is None:
            error = line[2:][:500]
    report = {"passed": passed, "total": total, "flags": sorted(set(flags))[:16],
              "status": status, "cpu": cpu, "error": error}
    os.write(result_fd, (nonce + " " + json.dumps(report) + "\n").encode())
    os._exit(0)


if __name__ == "__main__":
    main()
