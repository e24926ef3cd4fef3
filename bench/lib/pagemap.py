"""Prints the offsets (from the first mapping) of the pages of BINARY mapped into PID.

Usage: pagemap.py PID BINARY   (root: /proc/PID/pagemap)
One line per present page: `0x<offset> <perms>`.
"""
import struct
import sys


def main():
    pid, binary = sys.argv[1], sys.argv[2]
    with open(f"/proc/{pid}/maps") as f:
        maps = [line.split() for line in f]
    mine = [m for m in maps if len(m) > 5 and m[5] == binary]
    if not mine:
        sys.exit(f"{binary} is not mapped into {pid}")
    base = int(mine[0][0].split("-")[0], 16)
    with open(f"/proc/{pid}/pagemap", "rb") as pm:
        for m in mine:
            start, end = (int(x, 16) for x in m[0].split("-"))
            for va in range(start, end, 4096):
                pm.seek(va // 4096 * 8)
                (entry,) = struct.unpack("<Q", pm.read(8))
                if entry >> 63 & 1:
                    print(hex(va - base), m[1])


if __name__ == "__main__":
    main()
