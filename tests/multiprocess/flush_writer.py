"""Random small writes, each followed by an NBD FLUSH (libnbd), run under /usr/bin/python3.

Usage: flush_writer.py URI SIZE SECONDS SEED [MAX_LEN]

Write k (k = 1, 2, ...) puts ``length`` bytes (4 KiB by default; 512 B .. MAX_LEN if MAX_LEN is
given) of a deterministic pattern at a random 512-aligned offset, then flushes. After each
flush returns it prints ``ACK k`` (so everything up to write k is acknowledged durable). Ends
with ``DONE k errors=E`` after SECONDS, or ``ERR k <error>`` at the first failure. The writes
are reproducible from SEED with :func:`writes`.
"""

import random
import sys
import time


def writes(size, seed, max_len=None):
    """The (offset, data) of write 1, 2, ... for this size and seed."""
    rng = random.Random(seed)
    while True:
        length = 4096 if max_len is None else rng.randrange(512, max_len + 1, 512)
        offset = rng.randrange(0, size - length + 1, 512)
        yield offset, rng.randbytes(length)


def main():
    import nbd

    uri, size, seconds, seed = sys.argv[1], int(sys.argv[2]), float(sys.argv[3]), int(sys.argv[4])
    max_len = int(sys.argv[5]) if len(sys.argv) > 5 else None
    h = nbd.NBD()
    h.connect_uri(uri)
    deadline = time.monotonic() + seconds
    k = 0
    try:
        for offset, data in writes(size, seed, max_len):
            if time.monotonic() >= deadline:
                break
            h.pwrite(data, offset)
            h.flush()
            k += 1
            print(f"ACK {k}", flush=True)
    except Exception as exc:  # report any client error and stop
        print(f"ERR {k} {exc}", flush=True)
        return 1
    print(f"DONE {k} errors=0", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
