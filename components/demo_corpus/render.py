"""Scenes to image bytes, with PIL only: shapes on solid, gradient or textured backgrounds.

A ``Scene`` says what is in the picture (sampled in ``scenes.py``); an ``Encoding`` says how its file is
written (format, pixel mode, EXIF orientation, and the small shift/rescale of a near-duplicate).
``render_job`` is the pure function the rendering pool maps: same job, same bytes.
"""
from __future__ import annotations

import io
import math
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageChops, ImageDraw, ImageFilter

# EXIF orientation -> the transpose that stores an upright image so that honoring the tag shows it upright
_STORE_FOR_ORIENTATION = {3: Image.Transpose.ROTATE_180, 6: Image.Transpose.ROTATE_90, 8: Image.Transpose.ROTATE_270}
_EXIF_ORIENTATION_TAG = 0x0112
_SUPERSAMPLE_BELOW_PX = 512  # smooth edges for small images; large ones are drawn directly (fast enough)
_OUTLINE = (40, 40, 40)  # objects on transparent backgrounds
_GRADIENT_GRID = 32
_SHAPE_REACH = 1.1  # every shape lies within this many radii of its center
_MARGIN = 4  # pixels around an object's box: room for its outline
_PNG_COMPRESS_LEVEL = 3  # a third of the default level's time for 12% larger files


@dataclass(frozen=True)
class SceneObject:
    shape: str
    color: str
    rgb: tuple[int, int, int]
    cell: tuple[int, int]  # (column, row) in a 3x3 grid: where captions say the object is
    cx: float  # center, as a fraction of the width
    cy: float  # center, as a fraction of the height
    radius: float  # as a fraction of the shorter side
    angle: float  # degrees

    @property
    def concept(self) -> str:
        return f"{self.color} {self.shape}"


@dataclass(frozen=True)
class Background:
    kind: str  # solid | gradient | texture
    colors: tuple[tuple[int, int, int], ...]
    angle: float = 0.0  # gradient direction, degrees
    seed: int = 0  # texture noise


@dataclass(frozen=True)
class Scene:
    width: int
    height: int
    background: Background
    objects: tuple[SceneObject, ...]

    @property
    def concepts(self) -> list[str]:
        return [o.concept for o in self.objects]


@dataclass(frozen=True)
class Encoding:
    format: str  # jpeg | png | webp
    mode: str = "RGB"  # RGB | L | P | RGBA
    quality: int = 90
    exif_orientation: int = 1  # 1: none; 3, 6, 8: pixels stored rotated
    shift: tuple[int, int] = (0, 0)  # near-duplicates: objects moved by a few pixels
    scale: float = 1.0  # near-duplicates: rescaled

    def stored_size(self, width: int, height: int) -> tuple[int, int]:
        """Upright size of the file of a ``width`` x ``height`` scene (after the near-duplicate rescale)."""
        if self.scale == 1.0:
            return width, height
        return max(round(width * self.scale), 8), max(round(height * self.scale), 8)

    @property
    def extension(self) -> str:
        return {"jpeg": "jpg", "png": "png", "webp": "webp"}[self.format]

    @property
    def content_type(self) -> str:
        return f"image/{self.format}"


def _regular_polygon(n: int, start_deg: float) -> list[tuple[float, float]]:
    return [(math.cos(math.radians(start_deg + 360 * k / n)), math.sin(math.radians(start_deg + 360 * k / n)))
            for k in range(n)]


def _star(points: int = 5, inner: float = 0.42) -> list[tuple[float, float]]:
    out = []
    for k in range(2 * points):
        r = 1.0 if k % 2 == 0 else inner
        a = math.radians(-90 + 180 * k / points)
        out.append((r * math.cos(a), r * math.sin(a)))
    return out


def _heart(steps: int = 48) -> list[tuple[float, float]]:
    pts = []
    for k in range(steps):
        t = 2 * math.pi * k / steps
        x = 16 * math.sin(t) ** 3
        y = 13 * math.cos(t) - 5 * math.cos(2 * t) - 2 * math.cos(3 * t) - math.cos(4 * t)
        pts.append((x / 17, -(y + 2.5) / 17))
    return pts


_ARM = 0.32
_POLYGONS: dict[str, list[tuple[float, float]]] = {
    "square": _regular_polygon(4, 45),
    "triangle": _regular_polygon(3, -90),
    "star": _star(),
    "hexagon": _regular_polygon(6, 0),
    "cross": [(-_ARM, -1), (_ARM, -1), (_ARM, -_ARM), (1, -_ARM), (1, _ARM), (_ARM, _ARM), (_ARM, 1), (-_ARM, 1),
              (-_ARM, _ARM), (-1, _ARM), (-1, -_ARM), (-_ARM, -_ARM)],
    "diamond": [(0, -1), (0.62, 0), (0, 1), (-0.62, 0)],
    "heart": _heart(),
}


def _disc(size: tuple[int, int], cx: float, cy: float, r: float) -> Image.Image:
    mask = Image.new("L", size, 0)
    ImageDraw.Draw(mask).ellipse((cx - r, cy - r, cx + r, cy + r), fill=255)
    return mask


def shape_mask(shape: str, size: tuple[int, int], cx: float, cy: float, r: float, angle: float) -> Image.Image:
    """An L mask (255 inside) of one shape centered at (cx, cy) pixels with radius r pixels."""
    if shape == "circle":
        return _disc(size, cx, cy, r)
    if shape == "ring":
        return ImageChops.subtract(_disc(size, cx, cy, r), _disc(size, cx, cy, 0.55 * r))
    if shape == "crescent":
        a = math.radians(angle)
        return ImageChops.subtract(_disc(size, cx, cy, r),
                                   _disc(size, cx + 0.45 * r * math.cos(a), cy + 0.45 * r * math.sin(a), 0.85 * r))
    ca, sa = math.cos(math.radians(angle)), math.sin(math.radians(angle))
    pts = [(cx + r * (x * ca - y * sa), cy + r * (x * sa + y * ca)) for x, y in _POLYGONS[shape]]
    mask = Image.new("L", size, 0)
    ImageDraw.Draw(mask).polygon(pts, fill=255)
    return mask


def _background(bg: Background, width: int, height: int) -> Image.Image:
    if bg.kind == "solid":
        return Image.new("RGB", (width, height), bg.colors[0])
    if bg.kind == "gradient":  # a linear ramp, computed on a small grid and stretched (bilinear keeps it linear)
        gh, gw = min(height, _GRADIENT_GRID), min(width, _GRADIENT_GRID)
        ys, xs = np.mgrid[0:gh, 0:gw].astype(np.float32)
        a = math.radians(bg.angle)
        t = xs / max(gw - 1, 1) * math.cos(a) + ys / max(gh - 1, 1) * math.sin(a)
        t = (t - t.min()) / max(float(t.max() - t.min()), 1e-6)
        c0, c1 = (np.array(c, dtype=np.float32) for c in bg.colors[:2])
        pixels = c0 * (1 - t[..., None]) + c1 * t[..., None]
        small = Image.fromarray(pixels.round().astype(np.uint8), "RGB")
        return small.resize((width, height), Image.Resampling.BILINEAR)
    # texture: coarse noise blown up smoothly, so it reads as texture and still compresses; mostly
    # brightness noise, little hue noise, so the background never takes on an object's color
    rng = np.random.default_rng(bg.seed)
    grid = (max(height // 12, 2), max(width // 12, 2))
    noise = rng.normal(0, 16, size=grid + (1,)) + rng.normal(0, 5, size=grid + (3,))
    coarse = np.array(bg.colors[0], dtype=np.float32) + noise
    small = Image.fromarray(coarse.clip(0, 255).astype(np.uint8), "RGB")
    return small.resize((width, height), Image.Resampling.BICUBIC)


def _object_mask(obj: SceneObject, width: int, height: int, ss: int, shift: tuple[int, int]):
    """The object's mask over its bounding box (plus a margin for outlines) and that box in image pixels."""
    r = obj.radius * min(width, height) * ss
    cx, cy = (obj.cx * width + shift[0]) * ss, (obj.cy * height + shift[1]) * ss
    reach = r * _SHAPE_REACH
    x0, y0 = max(int((cx - reach) // ss) - _MARGIN, 0), max(int((cy - reach) // ss) - _MARGIN, 0)
    x1, y1 = min(int((cx + reach) // ss) + _MARGIN, width), min(int((cy + reach) // ss) + _MARGIN, height)
    if x1 <= x0 or y1 <= y0:
        return None, None
    mask = shape_mask(obj.shape, ((x1 - x0) * ss, (y1 - y0) * ss), cx - x0 * ss, cy - y0 * ss, r, obj.angle)
    if ss > 1:
        mask = mask.resize((x1 - x0, y1 - y0), Image.Resampling.BOX)
    return mask, (x0, y0, x1, y1)


def render_scene(scene: Scene, shift: tuple[int, int] = (0, 0), transparent: bool = False) -> Image.Image:
    """The upright scene as an RGB image; RGBA with a see-through background when ``transparent``.

    Transparent scenes outline their objects in dark gray, so that white and black objects stay visible
    whichever color a reader mattes the background with (img2dataset mattes on white).
    """
    w, h = scene.width, scene.height
    ss = 2 if max(w, h) < _SUPERSAMPLE_BELOW_PX else 1
    image = _background(scene.background, w, h)
    alpha = Image.new("L", (w, h), 0)
    for obj in scene.objects:
        mask, box = _object_mask(obj, w, h, ss, shift)
        if mask is None:
            continue
        if transparent:
            outline = mask.filter(ImageFilter.MaxFilter(3 if ss > 1 else 7))
            image.paste(_OUTLINE, box, outline)
            alpha.paste(ImageChops.lighter(alpha.crop(box), outline), box)
        image.paste(obj.rgb, box, mask)
    if transparent:
        image.putalpha(alpha)
    return image


def encode(image: Image.Image, enc: Encoding) -> bytes:
    """File bytes of ``image`` in the encoding's format and pixel mode."""
    if enc.scale != 1.0:
        image = image.resize(enc.stored_size(image.width, image.height), Image.Resampling.LANCZOS)
    if enc.mode == "L":
        image = image.convert("L")
    elif enc.mode == "P":
        image = image.convert("RGB").quantize(colors=64)
    elif enc.mode == "RGB":
        image = image.convert("RGB")
    kwargs: dict = {}
    if enc.exif_orientation in _STORE_FOR_ORIENTATION:
        image = image.transpose(_STORE_FOR_ORIENTATION[enc.exif_orientation])
        exif = Image.Exif()
        exif[_EXIF_ORIENTATION_TAG] = enc.exif_orientation
        kwargs["exif"] = exif.tobytes()
    if enc.format in ("jpeg", "webp"):
        kwargs["quality"] = enc.quality
    else:
        kwargs["compress_level"] = _PNG_COMPRESS_LEVEL
    buf = io.BytesIO()
    image.save(buf, format=enc.format.upper(), **kwargs)
    return buf.getvalue()


def render_job(job: tuple[Scene, Encoding]) -> bytes:
    scene, enc = job
    return encode(render_scene(scene, enc.shift, transparent=enc.mode == "RGBA"), enc)
