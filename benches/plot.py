#!/usr/bin/env python3
"""Server CPU per delivery and p99 latency against the delivery rate, one line per server,
as an SVG, from the JSON lines benches/writepath.sh prints (one tickerd-bench step each,
tagged with its server). Standard library only.

    python3 benches/plot.py writepath.jsonl [title] > docs/writepath.svg
"""

import json
import math
import sys

COLORS = {"tickerd": "#1b7f3b", "tickerd-hyper": "#8a8a8a", "grpc-go": "#c0392b"}
LABELS = {
    "tickerd": "tickerd (own HTTP/2)",
    "tickerd-hyper": "tickerd --http2 hyper",
    "grpc-go": "grpc-go",
}
W, H = 900, 380
PANEL_W, PANEL_H = 360, 260
LEFT = (70, 520)
TOP = 60


def load(path):
    series = {}
    for line in open(path):
        line = line.strip()
        if not line:
            continue
        step = json.loads(line)
        if step.get("server_cpu_us_per_delivery") is None:
            continue
        series.setdefault(step["server"], []).append(step)
    for steps in series.values():
        steps.sort(key=lambda s: s["delivered_per_sec"])
    return series


def ticks(lo, hi, n=6):
    """Round marks from lo up to hi, about n of them."""
    raw = (hi - lo) / n
    mag = 10 ** math.floor(math.log10(raw))
    step = next(m * mag for m in (1, 2, 2.5, 5, 10) if m * mag >= raw)
    marks, m = [], lo
    while m <= hi + 1e-9:
        marks.append(round(m, 10))
        m += step
    return marks


def panel(out, x0, title, series, value, xmax, ymax, log=False, unit=""):
    out.append(f'<text x="{x0 + PANEL_W / 2}" y="{TOP - 12}" text-anchor="middle" font-weight="bold">{title}</text>')
    out.append(f'<rect x="{x0}" y="{TOP}" width="{PANEL_W}" height="{PANEL_H}" fill="none" stroke="#444"/>')

    def sx(x):
        return x0 + PANEL_W * x / xmax

    if log:
        lo, hi = 0.1, max(ymax, 1.0)
        top = math.ceil(math.log10(hi))

        def sy(y):
            y = max(y, lo)
            return TOP + PANEL_H * (1 - (math.log10(y) - math.log10(lo)) / (top - math.log10(lo)))

        marks = [10 ** e for e in range(-1, top + 1)]
    else:

        def sy(y):
            return TOP + PANEL_H * (1 - y / ymax)

        marks = ticks(0, ymax)
    for m in marks:
        y = sy(m)
        out.append(f'<line x1="{x0}" x2="{x0 + PANEL_W}" y1="{y:.1f}" y2="{y:.1f}" stroke="#ddd"/>')
        label = f"{m:g}"
        out.append(f'<text x="{x0 - 6}" y="{y + 4:.1f}" text-anchor="end" font-size="11">{label}</text>')
    for m in ticks(0, xmax):
        x = sx(m)
        out.append(f'<text x="{x:.1f}" y="{TOP + PANEL_H + 16}" text-anchor="middle" font-size="11">{m / 1000:g}k</text>')
    out.append(f'<text x="{x0 + PANEL_W / 2}" y="{TOP + PANEL_H + 34}" text-anchor="middle" font-size="12">deliveries/s</text>')
    out.append(f'<text x="{x0 - 48}" y="{TOP + PANEL_H / 2}" text-anchor="middle" font-size="12" transform="rotate(-90 {x0 - 48} {TOP + PANEL_H / 2})">{unit}</text>')
    for name, steps in series.items():
        color = COLORS.get(name, "#333")
        points = [(sx(s["delivered_per_sec"]), sy(value(s))) for s in steps]
        path = " ".join(f"{x:.1f},{y:.1f}" for x, y in points)
        out.append(f'<polyline points="{path}" fill="none" stroke="{color}" stroke-width="2"/>')
        for x, y in points:
            out.append(f'<circle cx="{x:.1f}" cy="{y:.1f}" r="3" fill="{color}"/>')


def main():
    series = load(sys.argv[1])
    title = sys.argv[2] if len(sys.argv) > 2 else "1,000 streams on 50 connections, 10 random symbols of 100"
    xmax = max(s["delivered_per_sec"] for steps in series.values() for s in steps) * 1.05
    cpu = lambda s: s["server_cpu_us_per_delivery"]
    p99 = lambda s: s["latency_us"]["p99"] / 1000.0
    cpu_max = max(cpu(s) for steps in series.values() for s in steps) * 1.1
    p99_max = max(p99(s) for steps in series.values() for s in steps)
    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{W}" height="{H}" font-family="sans-serif">',
           f'<rect width="{W}" height="{H}" fill="white"/>',
           f'<text x="{W / 2}" y="20" text-anchor="middle" font-size="14">{title}</text>']
    panel(out, LEFT[0], "server CPU per delivery", series, cpu, xmax, cpu_max, unit="µs")
    panel(out, LEFT[1], "p99 latency (log scale)", series, p99, xmax, p99_max, log=True, unit="ms")
    for i, name in enumerate(series):
        x = LEFT[0] + i * 260
        color = COLORS.get(name, "#333")
        out.append(f'<rect x="{x}" y="{H - 22}" width="14" height="4" fill="{color}"/>')
        out.append(f'<text x="{x + 20}" y="{H - 16}" font-size="12">{LABELS.get(name, name)}</text>')
    out.append("</svg>")
    print("\n".join(out))


if __name__ == "__main__":
    main()
