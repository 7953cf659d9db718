#!/usr/bin/env python3
"""Runs a command with a custom scheduling slice (Linux >= 6.12, EEVDF): what util-linux
2.41's `chrt --other --sched-runtime NS 0 CMD` does, for machines with an older chrt.

    python3 benches/slice.py 300000 target/release/tickerd --feed none

The slice is kept across exec and inherited by every thread the command starts. A shorter
slice gives a task an earlier virtual deadline, so a task woken on its core does not
preempt it mid-pass (benches/README.md, "What is left"). No privilege is needed: the
policy stays SCHED_OTHER at the same nice. 0 restores the kernel's default slice.
"""
import ctypes
import os
import platform
import struct
import sys

SYS_SCHED_SETATTR = {"x86_64": 314, "aarch64": 274}


def main():
    if len(sys.argv) < 3:
        sys.exit("usage: slice.py NANOSECONDS COMMAND [ARG...]")
    nr = SYS_SCHED_SETATTR.get(platform.machine())
    if nr is None:
        sys.exit(f"slice.py: no sched_setattr number known for {platform.machine()}")
    slice_ns = int(sys.argv[1])
    # struct sched_attr (56 bytes): size, policy (SCHED_OTHER), flags, nice, priority,
    # runtime (the slice for SCHED_OTHER), deadline, period, util_min, util_max.
    attr = struct.pack("IIQiIQQQII", 56, 0, 0, 0, 0, slice_ns, 0, 0, 0, 0)
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.syscall(nr, 0, ctypes.create_string_buffer(attr, len(attr)), 0) != 0:
        err = ctypes.get_errno()
        sys.exit(f"slice.py: sched_setattr: {os.strerror(err)} (a kernel before 6.12?)")
    os.execvp(sys.argv[2], sys.argv[2:])


if __name__ == "__main__":
    main()
