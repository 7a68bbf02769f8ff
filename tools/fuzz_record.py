"""Keep the latest tools/fuzz result in a Markdown file (docs/reliability.md):
the text between the two markers below is replaced, the rest is left alone."""

import os

BEGIN = "<!-- tools/fuzz --record: begin -->"
END = "<!-- tools/fuzz --record: end -->"


def render(summary, args):
    punts = ", ".join(f"{k} {v}" for k, v in summary["agent"]["punt"].items()) or "none"
    lines = [
        BEGIN,
        f"Latest recorded run ({summary['date']}): `tools/fuzz {' '.join(args)}`",
        "",
        "| cases | packets | features | seed | mismatches | time |",
        "|---|---|---|---|---|---|",
        f"| {summary['cases']} | {summary['packets']} | {', '.join(summary['features'])} | {summary['seed']} "
        f"| {summary['mismatches']} | {summary['seconds']} s |",
        "",
        f"In loxi-mirror's copy the fast path forwarded {summary['agent']['fast_path_packets']} packets and "
        f"punted: {punts}.",
    ]
    if summary.get("reproducer"):
        lines += ["", "Minimal reproducer of the first mismatch:", "", "```", summary["reproducer"], "```"]
    lines.append(END)
    return "\n".join(lines)


def record(path, summary, args):
    replace_block(path, render(summary, args))


def replace_block(path, block, begin=BEGIN, end=END):
    """Put `block` (which starts with `begin` and ends with `end`) in place of
    the text between those markers, or at the end of the file."""
    text = open(path).read() if os.path.exists(path) else ""
    if begin in text and end in text:
        head, rest = text.split(begin, 1)
        text = head + block + rest.split(end, 1)[1]
    else:
        text = text.rstrip("\n") + ("\n\n" if text else "") + block + "\n"
    with open(path, "w") as f:
        f.write(text)
