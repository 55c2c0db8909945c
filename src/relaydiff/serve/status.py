"""The status page at ``/``: the queue, recent jobs and each job's plan as a timeline.

It is public (no token), so it shows job ids, states and plans but no prompts, and finished
images only when the operator turns ``status_thumbnails`` on.
"""

from __future__ import annotations

import base64
import html

from relaydiff.engine.plan import Plan

_COLORS = {"edge": "#3b6fb6", "device": "#e08a2c"}


def plan_timeline_svg(plan: Plan, width: int = 240, height: int = 16) -> str:
    """One bar per segment, edge blue, device orange, labelled member[+adapter]."""
    steps = max(plan.steps, 1)
    bars = []
    for s in plan.segments:
        x, w = width * s.start / steps, width * (s.end - s.start) / steps
        label = html.escape(f"{s.member}{'+' + s.adapter if s.adapter else ''} {s.start}-{s.end}")
        bars.append(f'<rect x="{x:.1f}" y="0" width="{w:.1f}" height="{height}" fill="{_COLORS.get(s.node, "#888")}">'
                    f"<title>{label} on {html.escape(s.node)}</title></rect>"
                    f'<text x="{x + 3:.1f}" y="{height - 4}" font-size="10" fill="white">{label}</text>')
    return f'<svg width="{width}" height="{height}" role="img">{"".join(bars)}</svg>'


def render_status(service) -> str:
    counts = service.store.count_by_state()
    rows = []
    for rec in service.store.recent(25):
        thumb = ""
        if service.settings.status_thumbnails and rec.has_image:
            data = base64.b64encode(service.store.image(rec.id) or b"").decode()
            thumb = f'<img src="data:image/png;base64,{data}" width="48" height="48" alt="">'
        elif rec.state == "done" and not rec.has_image:
            thumb = '<span class="dim">on the device</span>'
        latency = f"{rec.latency_ms:.0f}" if rec.latency_ms is not None else ""
        rows.append(f"<tr><td><code>{rec.id[:10]}</code></td><td>{html.escape(rec.client)}</td><td>{rec.round_id}</td>"
                    f"<td>{rec.state}{' (fallback)' if rec.fallback else ''}</td><td>{rec.kind}</td>"
                    f"<td>{plan_timeline_svg(Plan.from_list(rec.plan))}</td><td>{latency}</td><td>{thumb}</td></tr>")
    state_cells = "".join(f"<li>{html.escape(s)}: {n}</li>" for s, n in sorted(counts.items()))
    return f"""<!doctype html><html><head><meta charset="utf-8"><title>relaydiff edge</title>
<meta http-equiv="refresh" content="5">
<style>body{{font-family:sans-serif;margin:1.5em}} td{{padding:2px 8px}} code{{font-size:90%}}
.dim{{color:#888;font-size:85%}}</style></head>
<body><h1>relaydiff edge</h1>
<p>family <b>{html.escape(service.family.id)}@{html.escape(service.family.version)}</b>,
scheduler <b>{html.escape(service.settings.scheduler)}</b>; executor queue: <b>{len(service.executor.active)}</b> chains,
unfinished jobs: <b>{service.unfinished}</b>. Plans: <span style="color:{_COLORS['edge']}">edge</span> /
<span style="color:{_COLORS['device']}">device</span> steps.</p>
<ul>{state_cells}</ul>
<table><tr><th>job</th><th>client</th><th>round</th><th>state</th><th>kind</th><th>plan (steps)</th>
<th>latency ms</th><th>image</th></tr>
{''.join(rows)}</table></body></html>"""
