"""Per-interface counters: the slots of the datapath's counters map.

The datapath counts every packet at [slot * LM_REASON_MAX + reason] of a
per-CPU array (tc_ingress.c, lm_exit), `slot` being the number the
reconciler wrote into the ingress link's lm_link entry; slot 0 counts the
packets of no slot (agent not ready, ingress not managed, more links than
slots).  A slot costs the datapath one load from the link entry it already
holds, where a hash keyed by (ifindex, reason) would cost a lookup per
packet.

Slots are handed out lowest first, so the agent reads only the slots up to
the highest in use.  When a link goes away its slot's counts are folded
into `retired` and zeroed, so the totals never go backwards and the next
link given the slot starts from zero.
"""

from typing import Dict, List, Optional, Tuple

from .bpfsys import array_lookup_batch
from .reasons import REASONS

Count = Tuple[int, int]  # (packets, bytes)
Rows = List[List[Count]]  # [slot][reason value]
NO_SLOT = 0
OTHER = "(other)"  # slot 0's label: packets counted before or without a managed ingress


class SlotAllocator:
    """ifindex -> counters slot (1..nslots-1); 0 once all are taken."""

    def __init__(self, nslots: int):
        self.nslots = nslots
        self.by_ifindex: Dict[int, int] = {}

    def assign(self, ifindex: int) -> Tuple[int, bool]:
        """The link's slot, and whether it was handed out just now."""
        slot = self.by_ifindex.get(ifindex)
        if slot is not None:
            return slot, False
        used = set(self.by_ifindex.values())
        slot = next((s for s in range(1, self.nslots) if s not in used), NO_SLOT)
        if slot != NO_SLOT:
            self.by_ifindex[ifindex] = slot
        return slot, slot != NO_SLOT

    def release(self, ifindex: int) -> Optional[int]:
        """Free the link's slot; returns it (None if it had none)."""
        return self.by_ifindex.pop(ifindex, None)

    def reset(self, assignments: Dict[int, int]) -> None:
        """Take over the slots found in the maps (after a re-read)."""
        self.by_ifindex = {i: s for i, s in assignments.items() if 0 < s < self.nslots}



def read_rows(table, first: int, nslots: int) -> Rows:
    """Slots first..first+nslots-1 of the BCC counters table, in one syscall."""
    ncpus = table.total_cpu
    raw = array_lookup_batch(table.map_fd, nslots * len(REASONS), 16 * ncpus, start=first * len(REASONS))
    return decode(raw, nslots, ncpus)


def high_water(slots: Dict[int, int]) -> int:
    """How many slots to read: 0 and every slot up to the highest in use."""
    return max(slots.values(), default=NO_SLOT) + 1


def decode(raw: bytes, nslots: int, ncpus: int, nreasons: int = len(REASONS)) -> Rows:
    """BPF_MAP_LOOKUP_BATCH output of the per-CPU counters (struct
    lm_counter {u64 packets, bytes} per CPU, the CPUs of one key together)
    -> rows summed over CPUs."""
    words = memoryview(raw).cast("Q")
    # word 2*(key*ncpus + cpu) is that CPU's packets for the key, the next its bytes
    packets = list(map(sum, zip(*[words[2 * cpu::2 * ncpus] for cpu in range(ncpus)])))
    nbytes = list(map(sum, zip(*[words[2 * cpu + 1::2 * ncpus] for cpu in range(ncpus)])))
    return [list(zip(packets[s * nreasons:(s + 1) * nreasons], nbytes[s * nreasons:(s + 1) * nreasons]))
            for s in range(nslots)]


def totals(rows: Rows, retired: Optional[List[Count]] = None) -> Dict[str, Count]:
    """{reason NAME: (packets, bytes)} over every slot plus retired links."""
    columns = list(zip(*rows, retired or [(0, 0)] * len(REASONS)))  # one per reason
    return {r.name: (sum(p for p, _ in columns[r.value]), sum(b for _, b in columns[r.value])) for r in REASONS}


def by_interface(rows: Rows, slots: Dict[int, int], names: Dict[int, str]) -> Dict[str, Dict[str, Count]]:
    """{interface name: {reason NAME: (packets, bytes)}} for every link with
    a slot (links the model no longer names are left out) and "(other)" for
    slot 0; reasons never counted are left out."""
    out = {}
    labelled = [(names[i], s) for i, s in slots.items() if i in names and s < len(rows)]
    for name, slot in labelled + [(OTHER, NO_SLOT)]:
        out[name] = {r.name: rows[slot][r.value] for r in REASONS if rows[slot][r.value][0]}
    return out


def summary(counts: Dict[str, Count]) -> Dict:
    """`status --json`'s shape of one set of counters: fast path packets and
    bytes, then punts (packets, bytes) and drops (packets) by reason."""
    drops = {r.name for r in REASONS if r.drop}
    fast = counts.get("FORWARDED", (0, 0))
    rest = {name: c for name, c in counts.items() if name != "FORWARDED"}
    return {"fast_path_packets": fast[0], "fast_path_bytes": fast[1],
            "punt": {name: p for name, (p, _) in rest.items() if name not in drops},
            "punt_bytes": {name: b for name, (_, b) in rest.items() if name not in drops},
            "drop": {name: p for name, (p, _) in rest.items() if name in drops}}
