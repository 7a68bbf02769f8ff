"""Measure how long the agent takes to mirror a kernel change into its maps.

Run inside the agent's namespace:
    reaction.py TABLE MATCH_JSON present|absent TIMEOUT -- COMMAND...

Runs COMMAND, then polls the agent's real map contents (control socket
`dump`, read from the BPF maps; a "prefix" or "interface"+"ip" in the
match makes it a point lookup) until a row matching every field of
MATCH_JSON is present / absent.  Prints {"ms": elapsed since COMMAND
returned} or {"ms": null} on timeout.
"""

import json
import subprocess
import sys
import time

from mirror import control


def matches(row, want):
    return all(row.get(k) == v for k, v in want.items())


def main(argv):
    sep = argv.index("--")
    table, want, mode, timeout = argv[0], json.loads(argv[1]), argv[2], float(argv[3])
    subprocess.run(argv[sep + 1:], check=True)
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        rows = control.request({"cmd": "dump", "table": table, "match": want})["entries"]
        found = any(matches(r, want) for r in rows)
        if found == (mode == "present"):
            print(json.dumps({"ms": (time.monotonic() - t0) * 1000}))
            return
        time.sleep(0.0005)
    print(json.dumps({"ms": None}))


if __name__ == "__main__":
    main(sys.argv[1:])
