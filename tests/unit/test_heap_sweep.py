"""The supervisor's periodic full collection (``hub.supervisor.loop.HEAP_SWEEP_INTERVAL``) keeps its heap flat
across worker respawns by emptying CPython's tuple free lists; this checks that this interpreter does that."""

import gc
import sys

DEAD = 1000


def test_a_full_collection_empties_the_tuple_free_lists() -> None:
    gc.collect()
    baseline = sys.getallocatedblocks()
    built = [tuple(i for i in range(16)) for _ in range(DEAD)]  # grown by resizing, as tuple(generator) does
    del built  # the dead tuples are kept in the free list of their length, still allocated
    parked = sys.getallocatedblocks() - baseline
    gc.collect()
    left = sys.getallocatedblocks() - baseline
    assert parked >= DEAD * 0.9, f"only {parked} blocks were kept after {DEAD} tuples died"
    assert left <= DEAD * 0.1, f"{left} of {parked} kept blocks outlived a full collection"
