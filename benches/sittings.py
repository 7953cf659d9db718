#!/usr/bin/env python3
"""The sittings' table from `benches/ab.sh` reports, so the README's figures can be redone.

Each JSONL file is one sitting (`JSONL=... benches/ab.sh`, both orders); each line one run,
with the build it ran. For each file and build: the runs, CPU per delivery (median and
range), the runs over the CPU line, the p99 range, and the runs over the p99 line; then the
total, over every file, of the runs of the chosen build that met both lines.
  python3 benches/sittings.py [--build B] [--cpu-us 0.8] [--p99-ms 1] [--misses] FILE...
  python3 benches/sittings.py benches/ab-2026-12-06-0*.jsonl
--misses then lists each counted run over a line beside the conditions it ran in: the load
generator's own CPU over the run, the server's preemptions per second and the machine's
steal (shown as - in reports that lack it), with their medians over the counted runs that
met both lines (what separates the VM's regimes).
--build picks the build whose runs are counted against the lines (default
target/release/tickerd), more than once for several; a run under ab.sh's SERVER_PREFIX is
named with the prefix before the build. Files written before ab.sh recorded prefixes name
a build only as it was given on the command line, e.g. "python3 benches/slice.py 0
target/release/tickerd" for the usual build of a sitting run under a prefix.
"""

import argparse
import collections
import json
import statistics

# One run: the server's CPU µs per delivery, p99 ms, the load generator's CPU seconds over
# the run, the server's preemptions per second, and the share of the machine's CPU time the
# host took (steal, %) over the run (None in reports that lack them).
Run = collections.namedtuple("Run", "cpu p99 loadgen_cpu preemptions steal")


def runs(path):
    """Build -> [Run] for one sitting, in run order."""
    by_build = collections.defaultdict(list)
    with open(path) as f:
        for line in f:
            report = json.loads(line)
            for step in report["steps"]:
                # A run under a prefix (ab.sh's SERVER_PREFIX) is a build of its own.
                build = report["build"]
                if report.get("server_prefix"):
                    build = f"{report['server_prefix']} {build}"
                by_build[build].append(
                    Run(
                        step["server_cpu_us_per_delivery"],
                        step["latency_us"]["p99"] / 1000,
                        step.get("loadgen_cpu_seconds"),
                        step.get("server_preemptions_per_sec"),
                        report.get("machine", {}).get("steal_pct"),
                    )
                )
    return by_build


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("files", nargs="+")
    ap.add_argument("--build", action="append", help="the build counted against the lines")
    ap.add_argument("--cpu-us", type=float, default=0.8, help="the CPU line, µs per delivery")
    ap.add_argument("--p99-ms", type=float, default=1.0, help="the p99 line, ms")
    ap.add_argument("--misses", action="store_true", help="list the counted runs over a line")
    args = ap.parse_args()
    counted = set(args.build or ["target/release/tickerd"])
    misses, hits = [], []
    print("| sitting | build | runs | CPU per delivery: median (range) | over the CPU line "
          "| p99 | over the p99 line |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for path in args.files:
        for build, rs in runs(path).items():
            cpu = [r.cpu for r in rs]
            p99 = [r.p99 for r in rs]
            over_cpu = sum(c > args.cpu_us for c in cpu)
            over_p99 = sum(p >= args.p99_ms for p in p99)
            print(f"| {path} | {build} | {len(rs)} | {statistics.median(cpu):.3f} µs "
                  f"({min(cpu):.3f}–{max(cpu):.3f}) | {over_cpu} | "
                  f"{min(p99):.2f}–{max(p99):.2f} ms | {over_p99} |")
            if build in counted:
                for i, r in enumerate(rs, 1):
                    ok = r.cpu <= args.cpu_us and r.p99 < args.p99_ms
                    (hits if ok else misses).append((path, build, i, r))
    print(f"\n{len(hits)} of {len(hits) + len(misses)} runs of {', '.join(sorted(counted))} met both lines "
          f"(≤ {args.cpu_us} µs per delivery, p99 < {args.p99_ms} ms).")
    if args.misses:
        print_misses(misses, hits)


def print_misses(misses, hits):
    def shown(v, fmt, unit=""):
        return "-" if v is None else format(v, fmt) + unit

    def median(values, fmt, unit=""):
        values = [v for v in values if v is not None]
        return shown(statistics.median(values) if values else None, fmt, unit)

    print("\n| sitting | build | run | CPU per delivery | p99 | load generator CPU "
          "| preemptions/s | steal |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for path, build, i, r in misses:
        print(f"| {path} | {build} | {i} | {r.cpu:.3f} µs | {r.p99:.2f} ms | "
              f"{shown(r.loadgen_cpu, '.2f', ' s')} | {shown(r.preemptions, ',.0f')} | "
              f"{shown(r.steal, '.2f', ' %')} |")
    print(f"| the {len(hits)} runs that met both lines, median | | | "
          f"{median((r.cpu for *_, r in hits), '.3f', ' µs')} | "
          f"{median((r.p99 for *_, r in hits), '.2f', ' ms')} | "
          f"{median((r.loadgen_cpu for *_, r in hits), '.2f', ' s')} | "
          f"{median((r.preemptions for *_, r in hits), ',.0f')} | "
          f"{median((r.steal for *_, r in hits), '.2f', ' %')} |")


if __name__ == "__main__":
    main()
