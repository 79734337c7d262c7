"""The search page served at ``/``: one self-contained HTML document (no CDN, no external fonts)."""

from __future__ import annotations

_PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>galr search</title>
<meta name="viewport" content="width=device-width, initial-scale=1">
<style>
 body{font:15px/1.4 system-ui,sans-serif;margin:1.5rem;color:#222;background:#fafafa}
 form{display:flex;flex-wrap:wrap;gap:.5rem;align-items:center;margin-bottom:.8rem}
 input[type=text]{flex:1 1 24rem;padding:.45rem;font-size:1rem}
 input[type=number]{width:4.5rem;padding:.35rem}
 button{padding:.45rem .9rem}
 #status{color:#666;margin:.4rem 0}
 .sheet{display:grid;grid-template-columns:repeat(auto-fill,minmax(180px,1fr));gap:.8rem}
 .hit{background:#fff;border:1px solid #ddd;border-radius:6px;padding:.4rem;font-size:.85rem}
 .hit img{width:100%;aspect-ratio:1;object-fit:cover;background:#eee;border-radius:4px}
 .caption{background:#fff;border:1px solid #ddd;border-radius:6px;padding:.5rem;margin:.3rem 0}
 .error{color:#b00020}
 .place{color:#555}
</style></head><body>
<h1>galr search</h1>
<form id="text-form">
 <input type="text" id="query" placeholder="two white planes next to the runway" aria-label="query" required>
 <label>top-k <input type="number" id="top-k" value="12" min="1" max="100"></label>
 <label><input type="checkbox" id="rerank" checked> MR rerank</label>
 KEY_FIELD
 <button type="submit" id="search">Search</button>
</form>
<form id="image-form">
 <label>Image to captions: <input type="file" id="image" accept="image/*"></label>
 <button type="submit" id="upload">Find captions</button>
</form>
<div id="status" role="status"></div>
<div id="results"></div>
<script>
"use strict";
const $ = (id) => document.getElementById(id);
function headers(extra) {
  const h = Object.assign({}, extra || {});
  const key = $("api-key") ? $("api-key").value : "";
  if (key) h["Authorization"] = "Bearer " + key;
  return h;
}
function text(tag, content, cls) {
  const node = document.createElement(tag);
  node.textContent = content;
  if (cls) node.className = cls;
  return node;
}
async function failed(response) {
  try { const body = await response.json(); return body.error.message; } catch (e) { return response.statusText; }
}
async function thumbnail(img, id) {
  const response = await fetch("/v1/thumbnail?id=" + encodeURIComponent(id), {headers: headers()});
  if (response.ok) img.src = URL.createObjectURL(await response.blob());
}
function score(hit) {
  return "cosine " + hit.score.toFixed(3) + (hit.rerank_score == null ? "" : " · MR " + hit.rerank_score.toFixed(3));
}
function imageHits(hits) {
  const sheet = document.createElement("div");
  sheet.className = "sheet";
  for (const hit of hits) {
    const card = document.createElement("div");
    card.className = "hit";
    const img = document.createElement("img");
    img.alt = hit.id;
    card.append(img, text("div", hit.rank + ". " + hit.id), text("div", score(hit)));
    const record = hit.record || {};
    if (record.lat != null && record.lon != null) {
      card.append(text("div", "lat " + record.lat.toFixed(5) + ", lon " + record.lon.toFixed(5), "place"));
    }
    sheet.append(card);
    thumbnail(img, hit.id);
  }
  return sheet;
}
$("text-form").addEventListener("submit", async (event) => {
  event.preventDefault();
  $("status").textContent = "searching…";
  const body = {queries: [$("query").value], top_k: Number($("top-k").value), rerank: $("rerank").checked};
  const response = await fetch("/v1/search/text", {method: "POST", body: JSON.stringify(body),
                                                    headers: headers({"Content-Type": "application/json"})});
  $("results").replaceChildren();
  if (!response.ok) { $("status").replaceChildren(text("span", await failed(response), "error")); return; }
  const result = (await response.json()).results[0];
  const t = result.timings_ms;
  $("status").textContent = result.hits.length + " images · " + (result.reranked ? "MR on" : "MR off") +
    " · encode " + t.encode.toFixed(1) + " ms, search " + t.search.toFixed(1) + " ms, rerank " + t.rerank.toFixed(1) + " ms";
  $("results").append(imageHits(result.hits));
});
$("image-form").addEventListener("submit", async (event) => {
  event.preventDefault();
  const file = $("image").files[0];
  if (!file) { $("status").textContent = "choose an image first"; return; }
  $("status").textContent = "searching…";
  const form = new FormData();
  form.append("image", file);
  form.append("top_k", $("top-k").value);
  form.append("rerank", $("rerank").checked ? "true" : "false");
  const response = await fetch("/v1/search/image", {method: "POST", body: form, headers: headers()});
  $("results").replaceChildren();
  if (!response.ok) { $("status").replaceChildren(text("span", await failed(response), "error")); return; }
  const answer = await response.json();
  $("status").textContent = answer.captions.length + " captions, " + answer.images.length + " similar images";
  for (const hit of answer.captions) {
    $("results").append(text("div", hit.rank + ". " + hit.id + " (" + score(hit) + ")", "caption"));
  }
  $("results").append(imageHits(answer.images));
});
</script></body></html>
"""

_KEY_FIELD = '<input type="password" id="api-key" placeholder="API key" aria-label="API key" autocomplete="off">'


def search_page(*, needs_key: bool) -> str:
    """The page's HTML; with ``needs_key`` it asks for the API key (kept in the page, sent as a bearer token)."""
    return _PAGE.replace("KEY_FIELD", _KEY_FIELD if needs_key else "")


__all__ = ["search_page"]
