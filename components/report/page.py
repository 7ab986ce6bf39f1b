"""The report's HTML page: one self-contained file (thumbnails inline) beside its PNG figures."""
from __future__ import annotations

import jinja2

TEMPLATE = """<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>clipmill curation report</title>
<style>
 body { font-family: system-ui, -apple-system, "Segoe UI", sans-serif; margin: 2rem auto; max-width: 1100px;
        color: #222; line-height: 1.45; padding: 0 1rem; }
 h1 { margin-bottom: .2rem; } h2 { margin-top: 2.2rem; border-bottom: 1px solid #ddd; padding-bottom: .2rem; }
 .meta { color: #666; font-size: .9rem; }
 table { border-collapse: collapse; margin: .8rem 0; font-size: .92rem; }
 th, td { border: 1px solid #ddd; padding: .35rem .6rem; text-align: left; vertical-align: top; }
 th { background: #f4f6f8; } td.num { text-align: right; font-variant-numeric: tabular-nums; }
 tr.total td { font-weight: 600; background: #fafafa; }
 img.plot { max-width: 100%; border: 1px solid #eee; }
 .grid { display: grid; grid-template-columns: repeat(auto-fill, minmax({{ thumb_px + 24 }}px, 1fr)); gap: .8rem; }
 .card { border: 1px solid #ddd; border-radius: 6px; padding: .4rem; font-size: .8rem; background: #fff; }
 .card img { display: block; margin: 0 auto .3rem; max-width: 100%; }
 .card.kept { border-top: 4px solid #3b78b0; } .card.dropped { border-top: 4px solid #d9822b; }
 .reason { display: inline-block; background: #fbe7d3; color: #7a3d00; border-radius: 3px; padding: 0 .3rem; }
 .ok { display: inline-block; background: #dce9f5; color: #1d4c75; border-radius: 3px; padding: 0 .3rem; }
 .caption { word-break: break-word; }
 .noimg { color: #999; text-align: center; padding: 1.2rem 0; font-style: italic; }
 ul.rewrites { margin: 0; padding-left: 1.1rem; }
</style></head>
<body>
<h1>Curation report</h1>
<p class="meta">{{ funnel[0].input | int }} URLs in, {{ funnel[-1].kept | int }} samples in the curated shards
({{ "%.1f" | format(100 * funnel[-1].kept / (funnel[0].input or 1)) }}%). Curated content hash
<code>{{ curated_hash[:16] }}</code>.</p>

<h2>Funnel</h2>
<img class="plot" src="funnel.png" alt="curation funnel">
<table>
<tr><th>stage</th><th>in</th><th>kept</th><th>dropped</th><th>dropped by reason</th></tr>
{% for s in funnel %}
<tr><td>{{ s.stage }}</td><td class="num">{{ "{:,}".format(s.input) }}</td>\
<td class="num">{{ "{:,}".format(s.kept) }}</td>
<td class="num">{{ "{:,}".format(s.input - s.kept) }}</td>
<td>{% for reason, n in s.dropped.items() %}<span class="reason">{{ reason }}</span> {{ "{:,}".format(n) }}\
{% if not loop.last %}, {% endif %}{% endfor %}</td></tr>
{% endfor %}
<tr class="total"><td>total</td><td class="num">{{ "{:,}".format(funnel[0].input) }}</td>
<td class="num">{{ "{:,}".format(funnel[-1].kept) }}</td><td class="num">{{ "{:,}".format(total_dropped) }}</td>\
<td>curated + dropped = URL list</td></tr>
</table>

<h2>Validation at the boundaries</h2>
<table>
<tr><th>boundary</th><th>Great Expectations</th><th>expectations passed</th><th>failed</th></tr>
{% for v in validation %}
<tr><td>{{ v.boundary }}</td>\
<td><span class="{{ 'ok' if v.status == 'passed' else 'reason' }}">{{ v.status }}</span></td>
<td class="num">{{ v.passed }} / {{ v.total }}</td><td>{{ v.failed | join(", ") }}</td></tr>
{% endfor %}
</table>

{% if defects is not none %}
<h2>Filters against the planted defects</h2>
<p class="meta">From the crawl's ground truth: of the samples that reached each step, how many carry the defect it
targets (planted), how many it dropped, and how many of those were planted.</p>
<table>
<tr><th>step</th><th>targets</th><th>reached</th><th>planted</th><th>dropped</th><th>dropped planted</th>\
<th>precision</th><th>recall</th></tr>
{% for d in defects %}
<tr><td>{{ d.step }}</td><td>{{ d.defect }}</td><td class="num">{{ "{:,}".format(d.reached) }}</td>\
<td class="num">{{ "{:,}".format(d.planted) }}</td>
<td class="num">{{ "{:,}".format(d.dropped) }}</td><td class="num">{{ "{:,}".format(d.dropped_planted) }}</td>
<td class="num">{{ "%.3f" | format(d.precision) if d.precision is not none else "–" }}</td>
<td class="num">{{ "%.3f" | format(d.recall) if d.recall is not none else "–" }}</td></tr>
{% else %}<tr><td colspan="8">no listed step targets a planted defect</td></tr>{% endfor %}
</table>
{% endif %}

{% if clip_scores %}
<h2>CLIP-score filter</h2>
<p class="meta">Step <code>{{ clip_scores.step }}</code>.</p>
<img class="plot" src="{{ clip_scores.figure }}" alt="CLIP score histogram">
{% endif %}

{% if entry_balance %}
<h2>Balancing</h2>
<p class="meta">Step <code>{{ entry_balance.step }}</code>.</p>
<img class="plot" src="{{ entry_balance.figure }}" alt="entry rank-frequency before and after balancing">
<table>
<tr><th>entry</th><th>texts before</th><th>texts after</th></tr>
{% for e in entry_balance.head_entries %}
<tr><td>{{ e.entry }}</td><td class="num">{{ "{:,}".format(e.count_before) }}</td>\
<td class="num">{{ "{:,}".format(e.count_after) }}</td></tr>
{% endfor %}
</table>
{% endif %}

<h2>Examples</h2>
<h3>Kept</h3>
<div class="grid">
{% for x in kept_examples %}<div class="card kept"><img src="{{ x.thumbnail }}" alt="">
<span class="ok">curated</span><div class="caption">{{ x.caption }}</div></div>
{% endfor %}</div>
<h3>Dropped</h3>
<div class="grid">
{% for x in dropped_examples %}<div class="card dropped">{% if x.thumbnail %}<img src="{{ x.thumbnail }}" alt="">\
{% else %}<div class="noimg">no image</div>{% endif %}
<span class="reason">{{ x.stage }}: {{ x.reason }}</span><div class="caption">{{ x.caption }}</div></div>
{% endfor %}</div>

{% if caption_rewrites %}{% set rs = caption_rewrites.summary %}
<h2>Caption rewrites</h2>
<p class="meta">Step <code>{{ caption_rewrites.step }}</code>: backend <code>{{ rs.backend }}</code>,\
 model <code>{{ rs.model }}</code>:
{{ "{:,}".format(rs.kept) }} of {{ "{:,}".format(rs.slots) }} rewrites kept
({{ rs.rewrites_per_caption }} asked per caption).</p>
<table>
<tr><th>dropped rewrites: reason</th><th>count</th></tr>
{% for reason, n in rs.dropped.items() %}<tr><td><span class="reason">{{ reason }}</span></td>\
<td class="num">{{ "{:,}".format(n) }}</td></tr>
{% else %}<tr><td colspan="2">none dropped</td></tr>{% endfor %}
</table>
<table>
<tr><th>original caption</th><th>rewrites</th></tr>
{% for x in caption_rewrites.examples %}
<tr><td class="caption">{{ x.caption }}</td><td><ul class="rewrites">{% for r in x.rewrites %}<li>{{ r }}</li>\
{% else %}<li><em>none kept</em></li>{% endfor %}</ul></td></tr>
{% endfor %}
</table>
{% endif %}
</body></html>
"""


def render_page(context: dict) -> str:
    """The HTML of the report for ``context`` (every text is escaped)."""
    env = jinja2.Environment(autoescape=True, undefined=jinja2.StrictUndefined)
    return env.from_string(TEMPLATE).render(**context)
