"""A self-contained HTML contact sheet of search results: thumbnails people can look at, no ids to decode."""

from __future__ import annotations

import base64
import datetime as _dt
import html
import io
from pathlib import Path
from typing import Sequence

from galr.atomic import write_text_atomically
from galr.runtime.report import timings_text

THUMBNAIL_PX = 160

_STYLE = """
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:24px;background:#f6f7f9;color:#1d2330}
h1{font-size:20px;margin:0 0 4px} .meta{color:#5b6474;font-size:13px;margin-bottom:20px}
section{background:#fff;border:1px solid #dde1e7;border-radius:8px;padding:14px 16px;margin-bottom:18px}
h2{font-size:16px;margin:0 0 2px} .timing{color:#5b6474;font-size:12px;margin-bottom:10px}
.row{display:flex;flex-wrap:wrap;gap:12px}
figure{margin:0;width:%(px)dpx} figure img{width:%(px)dpx;height:%(px)dpx;object-fit:cover;border-radius:4px;
border:1px solid #cfd5de;background:#e9ecf1} .missing{width:%(px)dpx;height:%(px)dpx;display:flex;align-items:center;
justify-content:center;background:#e9ecf1;color:#8a93a3;font-size:12px;border-radius:4px}
figcaption{font-size:12px;line-height:1.35;margin-top:4px;word-break:break-all}
.rank{font-weight:600} .score{color:#2f6fdf} .mr{color:#b5562b} .text{font-size:13px;padding:6px 0;border-top:1px solid #eef0f3}
""" % {"px": THUMBNAIL_PX}


def _jpeg_uri(picture, size: int) -> str:
    picture.thumbnail((size, size))
    buffer = io.BytesIO()
    picture.convert("RGB").save(buffer, format="JPEG", quality=82)
    return "data:image/jpeg;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


def thumbnail_data_uri(path: str | Path, size: int = THUMBNAIL_PX) -> str | None:
    """A small JPEG of ``path`` as a ``data:`` URI, or ``None`` when the file cannot be read."""
    from galr.preprocess.image import ImageLoadError, load_image

    try:
        picture = load_image(path)
    except (ImageLoadError, OSError):
        return None
    return _jpeg_uri(picture, size)


def record_thumbnail_uri(record: dict, size: int = THUMBNAIL_PX) -> str | None:
    """The thumbnail of a hit's record: its window read from the scene for a tile, else the image file."""
    from PIL import Image

    from galr.errors import GalrError

    if (record.get("extra") or {}).get("window") is None:
        return thumbnail_data_uri(record["path"], size) if record.get("path") else None
    from galr.runtime.index.scenes import read_record_pixels

    try:
        return _jpeg_uri(Image.fromarray(read_record_pixels(record)), size)
    except (GalrError, OSError):
        return None


def _place_text(record: dict) -> str:
    if record.get("lat") is None:
        window = (record.get("extra") or {}).get("window")
        return f"px {window[0]},{window[1]}" if window else ""
    return f"{record['lat']:.5f}, {record['lon']:.5f}"


def _scene_overviews(results: Sequence, side: int = 640) -> str:
    """Per scene with hits: its overview with every hit's window drawn (rank numbers on the boxes)."""
    from PIL import Image, ImageDraw

    from galr.errors import GalrError

    windows: dict[str, list] = {}
    for result in results:
        for hit in result.hits:
            record = hit.record or {}
            extra = record.get("extra") or {}
            if extra.get("window") and record.get("path"):
                windows.setdefault(record["path"], []).append((hit.rank, extra["window"], extra.get("scene", ""),
                                                               record))
    if not windows:
        return ""
    from galr.runtime.index.scenes import open_record_scene

    figures = []
    for path, boxes in windows.items():
        try:
            with open_record_scene(boxes[0][3]) as scene:  # the bands and stretch the tiles were indexed with
                picture = Image.fromarray(scene.overview(side))
                factor = picture.width / scene.width
        except (GalrError, OSError):
            continue
        draw = ImageDraw.Draw(picture)
        for rank, (col, row, width, height), _, _ in sorted(boxes, key=lambda box: box[0], reverse=True):
            box = [col * factor, row * factor, (col + width) * factor, (row + height) * factor]
            colour = (255, 64, 32) if rank == 1 else (255, 200, 0)
            draw.rectangle(box, outline=colour, width=2)
            draw.text((box[0] + 3, box[1] + 2), str(rank), fill=colour)
        uri = _jpeg_uri(picture, side)
        figures.append(f'<figure style="width:auto"><img style="width:auto;height:auto;max-width:{side}px" '
                       f'src="{uri}" alt="overview"><figcaption>{html.escape(boxes[0][2] or path)}: '
                       f'{len(boxes)} hit windows (rank 1 red)</figcaption></figure>')
    return f'<section><h2>Scenes</h2><div class="row">{"".join(figures)}</div></section>' if figures else ""


def _hit_html(hit, show_image: bool) -> str:
    scores = f'<span class="score">cos {hit.score:.3f}</span>'
    if hit.rerank_score is not None:
        scores += f' · <span class="mr">MR {hit.rerank_score:.3f}</span>'
    if not show_image:
        return f'<div class="text"><span class="rank">#{hit.rank}</span> {scores}<br>{html.escape(hit.id)}</div>'
    record = hit.record or {}
    uri = record_thumbnail_uri(record)
    picture = f'<img src="{uri}" alt="{html.escape(hit.id)}">' if uri else '<div class="missing">image not found</div>'
    size = f"{record['width']}×{record['height']}" if record.get("width") else ""
    place = _place_text(record)
    place = f"<br>{html.escape(place)}" if place else ""
    return (f"<figure>{picture}<figcaption><span class=\"rank\">#{hit.rank}</span> {scores}<br>"
            f"{html.escape(hit.id)} {html.escape(size)}{place}</figcaption></figure>")


def render_contact_sheet(results: Sequence, title: str, subtitle: str, mode: str = "text2image") -> str:
    """The HTML page (one section per query; thumbnails embedded, so the file can be mailed as is)."""
    show_images = mode == "text2image"
    sections = []
    for number, result in enumerate(results, start=1):
        timing = timings_text(result, " · ") + (" (MR on)" if result.reranked else "")
        query = html.escape(result.query)
        hits = "".join(_hit_html(hit, show_images) for hit in result.hits)
        body = f'<div class="row">{hits}</div>' if show_images else hits
        sections.append(f'<section><h2>{number}. {query}</h2><div class="timing">{timing}</div>{body}</section>')
    if show_images:
        sections.append(_scene_overviews(results))
    stamp = _dt.datetime.now().strftime("%Y-%m-%d %H:%M")
    return (f"<!DOCTYPE html><html lang=\"en\"><head><meta charset=\"utf-8\"><title>{html.escape(title)}</title>"
            f"<style>{_STYLE}</style></head><body><h1>{html.escape(title)}</h1>"
            f"<div class=\"meta\">{html.escape(subtitle)} · {stamp}</div>{''.join(sections)}</body></html>")


def write_contact_sheet(path: str | Path, results: Sequence, title: str, subtitle: str, mode: str = "text2image") -> Path:
    """Write the contact sheet to ``path`` atomically (a failed write leaves the previous file)."""
    path = Path(path)
    write_text_atomically(path, render_contact_sheet(results, title, subtitle, mode))
    return path
