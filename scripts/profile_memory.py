"""Peak resident memory of one bench_circuit child run (the issue-14 workload by default), by phase.

A thread samples /proc/self/statm every 3 ms and charges each sample to the minicirc function running at
that moment (the stage functions of minicirc.attribution's nodes, edges, find and sums, wrapped for the
run), so the peak can be placed: site states, IG, node effects, edges, merging. Flags after the script's name go to
bench_circuit.py (default: --preset issue14); try it with glibc's mmap threshold fixed, e.g.

    python scripts/profile_memory.py
    MALLOC_MMAP_THRESHOLD_=65536 python scripts/profile_memory.py
"""
import functools
import os
import sys
import tempfile
import threading
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bench_circuit  # noqa: E402
from minicirc.attribution import edges, find, nodes, sums  # noqa: E402

# Each function wrapped in the module whose global its callers look up: node_effects calls
# sparse_site_states (states.py) by the name nodes.py imported, find_circuit calls node_effects and
# edge_effects by find.py's names.
PHASES = {nodes: ["sparse_site_states", "ig_site_gradients", "site_effects"],
          edges: ["group_edge_effects", "upstream_site_edges", "downstream_rows", "upstream_effects", "merge_groups"],
          find: ["find_circuit", "node_effects", "edge_effects"]}


def main():
    running, peaks = ["setup"], {}

    def watch():
        page = os.sysconf("SC_PAGE_SIZE")
        while True:
            with open("/proc/self/statm") as f:
                rss = int(f.read().split()[1]) * page
            phase = running[-1]
            peaks[phase] = max(peaks.get(phase, 0), rss)
            time.sleep(0.003)

    def tagged(name, fn):
        @functools.wraps(fn)
        def run(*args, **kwargs):
            running.append(name)
            try:
                return fn(*args, **kwargs)
            finally:
                running.pop()
        return run

    for module, names in PHASES.items():
        for name in names:
            setattr(module, name, tagged(name, getattr(module, name)))
    sums.EffectSums.add_edges = tagged("EffectSums.add_edges", sums.EffectSums.add_edges)
    bench_circuit.minicirc.find_circuit = find.find_circuit     # the child run calls it by this name
    threading.Thread(target=watch, daemon=True).start()
    child = tempfile.mkdtemp(prefix="minicirc-profile-")
    sys.argv = ["bench_circuit.py", *(sys.argv[1:] or ["--preset", "issue14"]), "--child", child]
    bench_circuit.main()
    print(open(os.path.join(child, "stats.json")).read())
    print("peak RSS while each function ran (innermost minicirc function at the sample):")
    for phase, rss in sorted(peaks.items(), key=lambda kv: -kv[1]):
        print(f"  {phase:24s} {rss / 2**30:6.2f} GiB")


if __name__ == "__main__":
    main()
