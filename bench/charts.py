"""A line chart as a small self-contained SVG, for the fleet benchmarks."""

COLORS = ["#d62728", "#ff7f0e", "#9467bd", "#2ca02c", "#1f77b4", "#8c564b"]


def line_chart(series, path, title, width=760, height=380):
    """series: [(label, [(x seconds, y), ...])]; writes the SVG to path."""
    left, bottom, top, right = 60, 40, 30, 200
    points = [p for _, pts in series for p in pts] or [(1, 1)]
    x_max = max(x for x, _ in points) or 1
    y_max = max(y for _, y in points) or 1
    step = next(s for s in (1, 2, 5, 10, 20, 25, 50, 100, 200, 250, 500, 1000, 2000, 5000, 10000)
                if y_max / s <= 8)
    y_top = step * (int(y_max // step) + 1)

    def sx(x):
        return left + (width - left - right) * x / x_max

    def sy(y):
        return height - bottom - (height - bottom - top) * y / y_top

    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" font-family="sans-serif" '
           f'font-size="12"><rect width="100%" height="100%" fill="white"/>',
           f'<text x="{left}" y="18" font-size="14">{title}</text>']
    for i in range(int(y_top // step) + 1):
        y = sy(i * step)
        out.append(f'<line x1="{left}" x2="{width - right}" y1="{y:.1f}" y2="{y:.1f}" stroke="#ddd"/>'
                   f'<text x="{left - 6}" y="{y + 4:.1f}" text-anchor="end">{i * step}</text>')
    tick = next(t for t in (10, 20, 30, 60, 120, 300) if x_max / t <= 10)
    for t in range(0, int(x_max) + 1, tick):
        out.append(f'<text x="{sx(t):.1f}" y="{height - bottom + 16}" text-anchor="middle">{t} s</text>')
    for i, (label, pts) in enumerate(series):
        color = COLORS[i % len(COLORS)]
        line = " ".join(f"{sx(x):.1f},{sy(y):.1f}" for x, y in pts)
        out.append(f'<polyline fill="none" stroke="{color}" stroke-width="2" points="{line}"/>')
        out.append(f'<rect x="{width - right + 12}" y="{top + 4 + 18 * i}" width="14" height="4" fill="{color}"/>'
                   f'<text x="{width - right + 32}" y="{top + 10 + 18 * i}">{label}</text>')
    out.append("</svg>\n")
    with open(path, "w") as f:
        f.write("\n".join(out))
