#!/usr/bin/env python3
"""Start N sprintjax processes on this machine, joined by jax.distributed over loopback.

    python launch/local.py --num-processes 2 --devices-per-process 4 -- \\
        train --config configs/tiny.py --workdir runs/tiny2

Each process gets `--coordinator 127.0.0.1:PORT --num-processes N --process-id I` appended, its own fake CPU
devices (XLA_FLAGS) and a log prefix. If one process fails, the others are stopped; the exit code is the first
non-zero one. SIGTERM/SIGINT to the launcher is forwarded to every process (a preemption drill).
Assumes: one machine, CPU devices, a free loopback port (picked automatically).
"""

import argparse
import os
import signal
import socket
import subprocess
import sys
import threading


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def pump(stream, prefix):
    for line in iter(stream.readline, ""):
        sys.stdout.write(f"{prefix}{line}")
        sys.stdout.flush()


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--num-processes", type=int, default=2)
    p.add_argument("--devices-per-process", type=int, default=1)
    p.add_argument("--sprintjax", default=os.path.join(os.path.dirname(sys.executable), "sprintjax"),
                   help="the sprintjax executable (default: beside this Python)")
    p.add_argument("command", nargs=argparse.REMAINDER, help="-- then the sprintjax subcommand and its arguments")
    a = p.parse_args(argv)
    cmd = a.command[1:] if a.command[:1] == ["--"] else a.command
    if not cmd:
        p.error("give the sprintjax command after --")
    port = free_port()
    xla_flags = os.environ.get("XLA_FLAGS", "") + f" --xla_force_host_platform_device_count={a.devices_per_process}"
    env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS=xla_flags.strip())  # the caller's own flags are kept
    procs = []
    for i in range(a.num_processes):
        full = [a.sprintjax, *cmd, "--coordinator", f"127.0.0.1:{port}", "--num-processes", str(a.num_processes),
                "--process-id", str(i)]
        procs.append(subprocess.Popen(full, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    pumps = [threading.Thread(target=pump, args=(pr.stdout, f"[{i}] "), daemon=True) for i, pr in enumerate(procs)]
    for t in pumps:
        t.start()

    def forward(signum, _frame):
        for pr in procs:
            if pr.poll() is None:
                pr.send_signal(signum)

    signal.signal(signal.SIGTERM, forward)
    signal.signal(signal.SIGINT, forward)
    code = 0
    remaining = set(range(len(procs)))
    while remaining:
        for i in list(remaining):
            try:
                rc = procs[i].wait(timeout=0.5)
            except subprocess.TimeoutExpired:
                continue
            remaining.discard(i)
            if rc and not code:
                code = rc
                for j in remaining:  # one failed: stop the rest, they would wait on it forever
                    procs[j].terminate()
    for t in pumps:
        t.join(timeout=5)
    return code


if __name__ == "__main__":
    sys.exit(main())
