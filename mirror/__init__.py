"""loxi-mirror: a transparent eBPF fast path for Linux networking."""
