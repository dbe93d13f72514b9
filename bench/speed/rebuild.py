#!/usr/bin/python3
"""Busy rebuild: five rounds of a ~160 MB structure of small containers built
and dropped, then two million short strings built and dropped. Between two
builds the freed memory is about to be used again: an allocator that gives
it back at once faults it back in (issue 18's first measurement)."""
checksum = 0
for step in range(5):
    data = [{"id": i, "tags": [i, step], "pair": (i, step)} for i in range(300_000)]
    checksum += sum(d["id"] for d in data[::1000])
    del data
    strs = [str(i) * 3 for i in range(2_000_000)]
    checksum += len(strs[-1])
    del strs
print(checksum)
