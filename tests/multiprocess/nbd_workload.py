"""NBD write workload with periodic flushes, run under /usr/bin/python3 (libnbd's ``nbd`` module).

Usage: nbd_workload.py URI SIZE SECONDS SEED OUT_MODEL [FLUSH_EVERY]

Writes random 4 KiB .. 256 KiB chunks at random offsets for SECONDS, flushing every FLUSH_EVERY
writes and once at the end. On success it writes the expected volume content (every write was
flushed) to OUT_MODEL and prints ``OK writes=N flushes=M``; on the first error it prints the
error, writes the content as of the last *successful flush* to OUT_MODEL and exits 1.
"""

import random
import sys
import time

import nbd


def main() -> int:
    uri, size, seconds, seed, out = (
        sys.argv[1],
        int(sys.argv[2]),
        float(sys.argv[3]),
        int(sys.argv[4]),
        sys.argv[5],
    )
    flush_every = int(sys.argv[6]) if len(sys.argv) > 6 else 16
    rng = random.Random(seed)
    h = nbd.NBD()
    h.connect_uri(uri)
    model = bytearray(h.pread(size, 0)) if h.get_size() == size else bytearray(size)
    flushed = bytes(model)
    writes = flushes = 0
    deadline = time.monotonic() + seconds
    try:
        while time.monotonic() < deadline:
            length = rng.choice([4096, 65536, 131072, 262144])
            offset = rng.randrange(0, size - length, 4096)
            data = rng.randbytes(length)
            h.pwrite(data, offset)
            model[offset : offset + length] = data
            writes += 1
            if writes % flush_every == 0:
                h.flush()
                flushed = bytes(model)
                flushes += 1
        h.flush()
        flushed = bytes(model)
        flushes += 1
    except nbd.Error as exc:
        print(f"ERROR after writes={writes} flushes={flushes}: {exc}", flush=True)
        with open(out, "wb") as fh:
            fh.write(flushed)
        return 1
    with open(out, "wb") as fh:
        fh.write(flushed)
    h.shutdown()
    print(f"OK writes={writes} flushes={flushes}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
