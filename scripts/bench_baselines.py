#!/usr/bin/env python3
"""Python baselines for colorun-bench, run against the same QEMU (or simulator) in the same run.

Usage: bench_baselines.py MODE ARGS...   (colorun-bench calls it; it prints one JSON line)

  raw-status SOCK N                 query-status round trips, raw AF_UNIX JSON-lines client
  lib-status SOCK N                 the same through qemu.qmp (asyncio)
  raw-cycle-serial P S FILE N       stop P, stop S, save P, cont P, cont S, one at a time
  raw-cycle-overlap P S FILE N      stops and conts of both sent together, replies read after
  lib-cycle-gather P S FILE N       qemu.qmp with asyncio.gather for the stops and conts
  raw-colo-overlap P S FILE N       overlap cycle plus xen-load-devices-state on S (simulator)
  raw-remus SOCK FILE N             stop, migrate exec:cat > FILE, poll query-migrate, cont

Output: {"samples_ns": [...]} (one duration per operation), or {"skip": "why"}.
The first WARMUP operations are not recorded.
"""
import json
import socket
import sys
import time

WARMUP = 20
now = time.perf_counter_ns


class Raw:
    """A blocking QMP client: one JSON object per line; events are skipped."""

    def __init__(self, path):
        # QEMU may not listen yet right after it started: retry for up to 5 s.
        deadline = time.monotonic() + 5
        while True:
            self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                self.sock.connect(path)
                break
            except (FileNotFoundError, ConnectionRefusedError):
                self.sock.close()
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.01)
        self.file = self.sock.makefile("rb")
        json.loads(self.file.readline())  # greeting
        self.send("qmp_capabilities")
        self.reply()

    def send(self, command, arguments=None):
        msg = {"execute": command}
        if arguments is not None:
            msg["arguments"] = arguments
        # Compact, no id: the bytes colorun sends (QEMU reads a command one byte per main-loop
        # iteration, so spaces would cost the baseline time that is not the client's).
        self.sock.sendall(json.dumps(msg, separators=(",", ":")).encode() + b"\n")

    def reply(self):
        while True:
            line = self.file.readline()
            if not line:
                raise EOFError("monitor closed")
            obj = json.loads(line)
            if "return" in obj:
                return obj["return"]
            if "error" in obj:
                raise RuntimeError(obj["error"])

    def cmd(self, command, arguments=None):
        self.send(command, arguments)
        return self.reply()

    def close(self):
        self.file.close()
        self.sock.close()


def timed(n, op):
    samples = []
    for i in range(WARMUP + n):
        t = now()
        op()
        if i >= WARMUP:
            samples.append(now() - t)
    return samples


def raw_status(sock, n):
    c = Raw(sock)
    s = timed(n, lambda: c.cmd("query-status"))
    c.close()
    return s


def raw_cycle(p_path, s_path, file, n, overlap, load=False):
    p, s = Raw(p_path), Raw(s_path)
    save = {"filename": file, "live": False}

    def serial():
        p.cmd("stop")
        s.cmd("stop")
        p.cmd("xen-save-devices-state", save)
        p.cmd("cont")
        s.cmd("cont")

    def overlapped():
        p.send("stop"); s.send("stop")
        p.reply(); s.reply()
        p.cmd("xen-save-devices-state", save)
        if load:
            s.cmd("xen-load-devices-state", {"filename": file})
        p.send("cont"); s.send("cont")
        p.reply(); s.reply()

    out = timed(n, overlapped if overlap else serial)
    p.close(); s.close()
    return out


def raw_remus(sock, file, n):
    c = Raw(sock)
    c.cmd("migrate-set-parameters", {"max-bandwidth": 107374182400})

    def cycle():
        c.cmd("stop")
        c.cmd("migrate", {"uri": "exec:cat > " + file})
        while True:
            status = c.cmd("query-migrate").get("status")
            if status == "completed":
                break
            if status in ("failed", "cancelled"):
                raise RuntimeError("migration " + status)
            time.sleep(0.0005)
        c.cmd("cont")

    global WARMUP
    WARMUP = 2
    out = timed(n, cycle)
    c.close()
    return out


def lib_mode(mode, args):
    try:
        import asyncio
        from qemu.qmp import QMPClient
    except ImportError as e:
        return {"skip": "qemu.qmp not importable: %s" % e}

    async def connect(path):
        c = QMPClient("bench")
        for _ in range(500):
            try:
                await c.connect(path)
                return c
            except Exception:
                await asyncio.sleep(0.01)
        await c.connect(path)
        return c

    async def status(sock, n):
        c = await connect(sock)
        samples = []
        for i in range(WARMUP + n):
            t = now()
            await c.execute("query-status")
            if i >= WARMUP:
                samples.append(now() - t)
        await c.disconnect()
        return samples

    async def cycle(p_path, s_path, file, n):
        p, s = await connect(p_path), await connect(s_path)
        samples = []
        for i in range(WARMUP + n):
            t = now()
            await asyncio.gather(p.execute("stop"), s.execute("stop"))
            await p.execute("xen-save-devices-state", {"filename": file, "live": False})
            await asyncio.gather(p.execute("cont"), s.execute("cont"))
            if i >= WARMUP:
                samples.append(now() - t)
        await p.disconnect(); await s.disconnect()
        return samples

    if mode == "lib-status":
        return {"samples_ns": asyncio.run(status(args[0], int(args[1])))}
    return {"samples_ns": asyncio.run(cycle(args[0], args[1], args[2], int(args[3])))}


def main():
    mode, args = sys.argv[1], sys.argv[2:]
    if mode.startswith("lib-"):
        result = lib_mode(mode, args)
    elif mode == "raw-status":
        result = {"samples_ns": raw_status(args[0], int(args[1]))}
    elif mode in ("raw-cycle-serial", "raw-cycle-overlap"):
        result = {"samples_ns": raw_cycle(args[0], args[1], args[2], int(args[3]), mode.endswith("overlap"))}
    elif mode == "raw-colo-overlap":
        result = {"samples_ns": raw_cycle(args[0], args[1], args[2], int(args[3]), True, load=True)}
    elif mode == "raw-remus":
        result = {"samples_ns": raw_remus(args[0], args[1], int(args[2]))}
    else:
        result = {"skip": "unknown mode " + mode}
    print(json.dumps(result))


if __name__ == "__main__":
    main()
