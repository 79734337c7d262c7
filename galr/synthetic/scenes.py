"""Synthetic top-down remote-sensing scenes: a JSON-serialisable description and a fast renderer.

A :class:`SceneSpec` describes a whole image: a primary land cover, an optional secondary land cover
laid out as one side of the image, a river or a central patch, and groups of DOTA-class objects
(every instance with centre, size, rotation and colour). :func:`sample_scene` draws a plausible spec
from a seeded ``numpy.random.Generator`` and :func:`render_scene` turns it into an RGB image with
numpy textures (low-frequency noise from upsampled random grids) and Pillow polygons.

Coordinates are normalised to the image side: ``x`` grows to the right, ``y`` grows downwards, both in
``[0, 1]``. Object sizes are fractions of the image side. An instance's ``angle`` (degrees) is the
direction of its length axis, measured from ``+x`` towards ``+y`` (clockwise on screen).

Everything is torch-free (numpy + Pillow) and deterministic: the rendered pixels depend only on the
spec (textures are seeded by ``SceneSpec.texture_seed``), so a spec read back from JSON renders the
same image.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any, Callable, Mapping, Sequence

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

from galr.errors import InputError
from galr.serialization import fields_from_dict

LAND_COVERS: tuple[str, ...] = ("water", "grass", "bare-soil", "urban", "forest", "desert")
OBJECT_CLASSES: tuple[str, ...] = (
    "plane",
    "ship",
    "storage-tank",
    "baseball-diamond",
    "tennis-court",
    "basketball-court",
    "ground-track-field",
    "harbor",
    "bridge",
    "large-vehicle",
    "small-vehicle",
    "helicopter",
    "roundabout",
    "soccer-ball-field",
    "swimming-pool",
)
HALF_LAYOUTS: tuple[str, ...] = ("left", "right", "top", "bottom")
RIVER_LAYOUTS: tuple[str, ...] = ("river-horizontal", "river-vertical", "river-diagonal")
LAYOUTS: tuple[str, ...] = ("full",) + HALF_LAYOUTS + RIVER_LAYOUTS + ("centre",)

# Named object colours (RGB). Captions use these names, so every rendered colour has one.
COLOURS: Mapping[str, tuple[int, int, int]] = MappingProxyType(
    {
        "white": (232, 232, 226),
        "grey": (140, 142, 146),
        "black": (38, 38, 42),
        "red": (186, 48, 42),
        "blue": (48, 84, 176),
        "green": (62, 146, 72),
        "orange": (222, 128, 44),
        "yellow": (226, 196, 58),
        "brown": (156, 106, 66),
    }
)
# Swimming pools are "blue" in captions but rendered in the cyan of real pools.
_CLASS_COLOUR_OVERRIDES: Mapping[tuple[str, str], tuple[int, int, int]] = MappingProxyType(
    {
        ("swimming-pool", "blue"): (70, 176, 222),
    }
)

_WHITE = (236, 236, 232, 255)
_ASPHALT = (88, 88, 92, 255)
_SUPERSAMPLE = 2  # objects are drawn at 2x and box-filtered down, a cheap anti-aliasing


@dataclass(frozen=True)
class ClassStyle:
    """How one object class looks and where it may be placed.

    Attributes:
        covers: land covers the object may stand on.
        length: range of the length (fraction of the image side).
        aspect: range of width / length.
        count: range of instances in one group.
        colours: colour names the class is drawn in.
        arrangements: group layouts to choose from (``row``, ``grid``, ``scatter``).
        layer: drawing order; ground-level structures (0) are drawn before vehicles (2).
        shadow_height: shadow length as a fraction of the object width (0 = flat, no shadow).
        colour_in_captions: whether captions may name the colour (not for, e.g., roundabouts).
    """

    covers: tuple[str, ...]
    length: tuple[float, float]
    aspect: tuple[float, float]
    count: tuple[int, int]
    colours: tuple[str, ...]
    arrangements: tuple[str, ...]
    layer: int
    shadow_height: float = 0.0
    colour_in_captions: bool = True


_FIELD_COVERS = ("grass", "urban", "bare-soil")
_VEHICLE_COLOURS = ("white", "red", "blue", "yellow", "grey")
# fmt: off
CLASS_STYLES: Mapping[str, ClassStyle] = MappingProxyType({
    "plane": ClassStyle(
        covers=("bare-soil", "urban", "desert"), length=(0.10, 0.16), aspect=(0.9, 1.05), count=(1, 6),
        colours=("white", "grey"), arrangements=("row", "scatter"), layer=2, shadow_height=0.12),
    "ship": ClassStyle(
        covers=("water",), length=(0.07, 0.15), aspect=(0.22, 0.3), count=(1, 8),
        colours=("white", "grey", "red", "blue"), arrangements=("scatter", "row"), layer=2),
    "storage-tank": ClassStyle(
        covers=("bare-soil", "urban", "desert"), length=(0.05, 0.09), aspect=(1.0, 1.0), count=(1, 9),
        colours=("white", "grey"), arrangements=("grid", "row", "scatter"), layer=2, shadow_height=0.25),
    "baseball-diamond": ClassStyle(  # a 90-degree fan: width = sqrt(2) * length
        covers=_FIELD_COVERS, length=(0.14, 0.2), aspect=(1.41, 1.42), count=(1, 2),
        colours=("brown",), arrangements=("row",), layer=0, colour_in_captions=False),
    "tennis-court": ClassStyle(
        covers=_FIELD_COVERS, length=(0.10, 0.13), aspect=(0.45, 0.55), count=(1, 4),
        colours=("green", "blue", "red"), arrangements=("row", "grid"), layer=0),
    "basketball-court": ClassStyle(
        covers=_FIELD_COVERS, length=(0.09, 0.12), aspect=(0.5, 0.6), count=(1, 3),
        colours=("orange", "blue", "green"), arrangements=("row",), layer=0),
    "ground-track-field": ClassStyle(
        covers=_FIELD_COVERS, length=(0.30, 0.40), aspect=(0.5, 0.6), count=(1, 1),
        colours=("red", "blue"), arrangements=("row",), layer=0),
    "harbor": ClassStyle(  # placed on a shore by _place_harbor
        covers=("water",), length=(0.26, 0.40), aspect=(0.35, 0.5), count=(1, 1),
        colours=("grey", "white"), arrangements=("special",), layer=0, colour_in_captions=False),
    "bridge": ClassStyle(  # placed across a river by _place_bridges; its length follows the river's width
        covers=("water",), length=(0.2, 0.5), aspect=(0.035, 0.055), count=(1, 2),
        colours=("grey", "white"), arrangements=("special",), layer=1, colour_in_captions=False),
    "large-vehicle": ClassStyle(
        covers=("urban", "bare-soil", "desert"), length=(0.05, 0.07), aspect=(0.3, 0.4), count=(1, 8),
        colours=_VEHICLE_COLOURS, arrangements=("row", "scatter"), layer=2, shadow_height=0.2),
    "small-vehicle": ClassStyle(
        covers=("urban", "bare-soil", "grass"), length=(0.026, 0.036), aspect=(0.45, 0.55), count=(2, 14),
        colours=("white", "black", "red", "blue", "grey"), arrangements=("row", "grid", "scatter"), layer=2,
        shadow_height=0.15),
    "helicopter": ClassStyle(
        covers=("urban", "bare-soil", "grass"), length=(0.06, 0.085), aspect=(0.9, 1.0), count=(1, 3),
        colours=("white", "grey", "green", "black"), arrangements=("row", "scatter"), layer=2, shadow_height=0.1),
    "roundabout": ClassStyle(
        covers=_FIELD_COVERS, length=(0.14, 0.22), aspect=(1.0, 1.0), count=(1, 1),
        colours=("grey",), arrangements=("row",), layer=0, colour_in_captions=False),
    "soccer-ball-field": ClassStyle(
        covers=_FIELD_COVERS, length=(0.22, 0.30), aspect=(0.6, 0.68), count=(1, 2),
        colours=("green",), arrangements=("row",), layer=0, colour_in_captions=False),
    "swimming-pool": ClassStyle(
        covers=("urban", "grass"), length=(0.05, 0.09), aspect=(0.45, 0.7), count=(1, 5),
        colours=("blue",), arrangements=("scatter", "row"), layer=1),
})
# fmt: on


@dataclass(frozen=True)
class Theme:
    """A scene type (airport, port, ...) that ties land covers, layouts and typical objects together.

    Attributes:
        primary: land covers the scene may be made of.
        secondary: land covers for the second region.
        layouts: where the second region may lie.
        classes: typical object classes with relative weights.
        secondary_required: whether the scene always has the second region (a port needs water).
    """

    primary: tuple[str, ...]
    secondary: tuple[str, ...]
    layouts: tuple[str, ...]
    classes: Mapping[str, float]
    secondary_required: bool = False

    def __post_init__(self) -> None:
        object.__setattr__(self, "classes", MappingProxyType(dict(self.classes)))


THEMES: Mapping[str, Theme] = MappingProxyType(
    {
        "airport": Theme(
            ("bare-soil", "urban", "desert"),
            ("grass", "urban", "bare-soil"),
            HALF_LAYOUTS,
            {"plane": 4, "helicopter": 1.5, "large-vehicle": 1, "small-vehicle": 1, "storage-tank": 0.5},
        ),
        "port": Theme(
            ("urban", "bare-soil"),
            ("water",),
            HALF_LAYOUTS,
            {"harbor": 4, "ship": 4, "storage-tank": 1, "large-vehicle": 1},
            secondary_required=True,
        ),
        "river": Theme(
            ("grass", "forest", "urban", "bare-soil", "desert"),
            ("water",),
            RIVER_LAYOUTS,
            {"bridge": 4, "ship": 2, "small-vehicle": 1, "large-vehicle": 0.5},
            secondary_required=True,
        ),
        "lake": Theme(
            ("grass", "forest", "urban", "desert"),
            ("water",),
            ("centre",),
            {"ship": 3, "swimming-pool": 1, "small-vehicle": 1, "tennis-court": 0.5},
            secondary_required=True,
        ),
        "sports": Theme(
            ("grass", "urban", "bare-soil"),
            ("forest", "urban", "grass", "bare-soil"),
            HALF_LAYOUTS + ("centre",),
            {
                "tennis-court": 2,
                "basketball-court": 2,
                "baseball-diamond": 2,
                "soccer-ball-field": 2,
                "ground-track-field": 2,
                "swimming-pool": 1,
            },
        ),
        "residential": Theme(
            ("urban",),
            ("grass", "forest", "water"),
            HALF_LAYOUTS + RIVER_LAYOUTS,
            {"small-vehicle": 3, "swimming-pool": 3, "roundabout": 1, "basketball-court": 1, "tennis-court": 1},
        ),
        "industrial": Theme(
            ("bare-soil", "urban", "desert"),
            ("grass", "bare-soil", "urban", "water"),
            HALF_LAYOUTS,
            {"storage-tank": 4, "large-vehicle": 3, "small-vehicle": 1},
        ),
        "junction": Theme(
            ("urban", "grass", "bare-soil"),
            ("forest", "grass", "urban"),
            HALF_LAYOUTS,
            {"roundabout": 4, "small-vehicle": 3, "large-vehicle": 2},
        ),
        "countryside": Theme(
            ("forest", "grass"),
            ("bare-soil", "grass", "forest", "water"),
            HALF_LAYOUTS + ("centre",),
            {
                "helicopter": 1,
                "small-vehicle": 1,
                "large-vehicle": 1,
                "swimming-pool": 1,
                "soccer-ball-field": 1,
                "baseball-diamond": 1,
            },
            secondary_required=True,
        ),
        "desert": Theme(
            ("desert",),
            ("bare-soil", "urban", "water"),
            HALF_LAYOUTS,
            {"storage-tank": 2, "large-vehicle": 2, "plane": 1, "small-vehicle": 1},
        ),
    }
)


@dataclass(frozen=True)
class ObjectInstance:
    """One object: centre and size normalised to the image side, angle in degrees (see module doc)."""

    cx: float
    cy: float
    length: float
    width: float
    angle: float


@dataclass(frozen=True)
class ObjectGroup:
    """Objects of one class and colour placed together (a row of planes, a parking lot of cars).

    Attributes:
        label: DOTA class name (hyphenated, one of :data:`OBJECT_CLASSES`).
        colour: colour name (a key of :data:`COLOURS`).
        rgb: the exact body colour drawn.
        instances: the objects.
        salient: whether captions may mention the group; ``False`` marks a distractor.
    """

    label: str
    colour: str
    rgb: tuple[int, int, int]
    instances: tuple[ObjectInstance, ...]
    salient: bool = True

    @property
    def count(self) -> int:
        return len(self.instances)

    @property
    def centroid(self) -> tuple[float, float]:
        return (float(np.mean([o.cx for o in self.instances])), float(np.mean([o.cy for o in self.instances])))


@dataclass(frozen=True)
class SceneSpec:
    """A complete scene description; :func:`render_scene` needs nothing else.

    Attributes:
        theme: the scene type it was sampled from (a key of :data:`THEMES`; informational).
        land_cover: primary land cover (one of :data:`LAND_COVERS`).
        secondary_cover: second land cover, or ``None`` when ``layout == "full"``.
        layout: where the secondary cover lies (one of :data:`LAYOUTS`).
        boundary: for side layouts the secondary cover's depth from its edge; for rivers the
            centre line's offset; unused for ``full``/``centre``.
        extent: river width or central patch radius (fraction of the side).
        wave_amplitude: amplitude of the boundary's sinusoidal wiggle.
        wave_frequency: wiggle periods across the image (or around the patch).
        wave_phase: wiggle phase in radians.
        texture_seed: seed of the texture noise.
        groups: object groups, drawn in layer order.
    """

    theme: str
    land_cover: str
    secondary_cover: str | None
    layout: str
    boundary: float
    extent: float
    wave_amplitude: float
    wave_frequency: int
    wave_phase: float
    texture_seed: int
    groups: tuple[ObjectGroup, ...] = ()

    def __post_init__(self) -> None:
        if self.land_cover not in LAND_COVERS:
            raise InputError(f"SceneSpec.land_cover must be one of {LAND_COVERS}, got {self.land_cover!r}")
        if self.layout not in LAYOUTS:
            raise InputError(f"SceneSpec.layout must be one of {LAYOUTS}, got {self.layout!r}")
        if (self.layout == "full") != (self.secondary_cover is None):
            raise InputError(
                "SceneSpec: secondary_cover must be None exactly when layout is 'full' "
                f"(layout={self.layout!r}, secondary_cover={self.secondary_cover!r})"
            )
        if self.secondary_cover is not None and self.secondary_cover not in LAND_COVERS:
            raise InputError(f"SceneSpec.secondary_cover must be one of {LAND_COVERS}, got {self.secondary_cover!r}")
        for group in self.groups:
            if group.label not in CLASS_STYLES:
                raise InputError(f"SceneSpec: unknown object class {group.label!r}; expected one of {OBJECT_CLASSES}")
            if group.colour not in COLOURS:
                raise InputError(f"SceneSpec: unknown colour {group.colour!r} for {group.label!r}")

    @property
    def covers_present(self) -> tuple[str, ...]:
        """The land covers in the image (primary first)."""
        return (self.land_cover,) if self.secondary_cover is None else (self.land_cover, self.secondary_cover)

    @property
    def salient_groups(self) -> tuple[ObjectGroup, ...]:
        return tuple(g for g in self.groups if g.salient)

    def secondary_mask(self, xs: np.ndarray, ys: np.ndarray) -> np.ndarray:
        """Whether each normalised point lies on the secondary cover (broadcasts ``xs`` with ``ys``)."""
        xs, ys = np.broadcast_arrays(np.asarray(xs, dtype=np.float64), np.asarray(ys, dtype=np.float64))
        if self.layout == "full":
            return np.zeros(xs.shape, dtype=bool)
        if self.layout in HALF_LAYOUTS:
            # Distance from the secondary cover's image edge, and position along that edge.
            frames = {"left": (xs, ys), "right": (1 - xs, ys), "top": (ys, xs), "bottom": (1 - ys, xs)}
            depth, along = frames[self.layout]
            return depth < self.boundary + self._wave(along)
        if self.layout in RIVER_LAYOUTS:
            along, across = self.river_coordinates(xs, ys)
            return np.abs(across - self._wave(along)) < self.extent / 2
        radius = np.hypot(xs - 0.5, ys - 0.5)
        theta = np.arctan2(ys - 0.5, xs - 0.5)
        return radius < self.extent * (1 + self.wave_amplitude * np.sin(self.wave_frequency * theta + self.wave_phase))

    def cover_at(self, xs: np.ndarray, ys: np.ndarray) -> np.ndarray:
        """Land-cover name at each normalised point (an object array of strings)."""
        mask = self.secondary_mask(xs, ys)
        out = np.full(mask.shape, self.land_cover, dtype=object)
        if self.secondary_cover is not None:
            out[mask] = self.secondary_cover
        return out

    def river_coordinates(self, xs: np.ndarray, ys: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(along, across) coordinates of points in a river layout's frame."""
        origin, along_axis, across_axis = self._river_frame()
        dx, dy = np.asarray(xs) - origin[0], np.asarray(ys) - origin[1]
        return dx * along_axis[0] + dy * along_axis[1], dx * across_axis[0] + dy * across_axis[1]

    def river_point(self, along: float) -> tuple[tuple[float, float], float]:
        """Centre-line point at ``along`` and the river's direction there (degrees)."""
        origin, along_axis, across_axis = self._river_frame()
        offset = float(self._wave(np.asarray(along)))
        omega = 2 * math.pi * self.wave_frequency
        slope = self.wave_amplitude * omega * math.cos(omega * along + self.wave_phase)  # d(offset)/d(along)
        point = (
            origin[0] + along * along_axis[0] + offset * across_axis[0],
            origin[1] + along * along_axis[1] + offset * across_axis[1],
        )
        direction = (along_axis[0] + slope * across_axis[0], along_axis[1] + slope * across_axis[1])
        return point, math.degrees(math.atan2(direction[1], direction[0]))

    def _river_frame(self) -> tuple[tuple[float, float], tuple[float, float], tuple[float, float]]:
        if self.layout == "river-horizontal":
            return (0.0, self.boundary), (1.0, 0.0), (0.0, 1.0)
        if self.layout == "river-vertical":
            return (self.boundary, 0.0), (0.0, 1.0), (1.0, 0.0)
        if self.layout == "river-diagonal":
            s = 1 / math.sqrt(2)
            offset = self.boundary - 0.5
            return (0.5 - offset * s, 0.5 + offset * s), (s, s), (-s, s)
        raise InputError(f"layout {self.layout!r} is not a river layout")

    def _wave(self, along: np.ndarray) -> np.ndarray:
        return self.wave_amplitude * np.sin(2 * np.pi * self.wave_frequency * along + self.wave_phase)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "SceneSpec":
        """Inverse of :meth:`to_dict`.

        Raises:
            ValueError: a field is missing or unknown, or a value is invalid.
        """
        names = {f.name for f in dataclasses.fields(cls)}
        unknown, missing = sorted(set(data) - names), sorted(names - set(data) - {"groups"})
        if unknown or missing:
            raise InputError(f"SceneSpec: unknown fields {unknown}, missing fields {missing}")
        values = dict(data)
        try:
            values["groups"] = tuple(
                ObjectGroup(
                    label=g["label"],
                    colour=g["colour"],
                    rgb=tuple(int(c) for c in g["rgb"]),
                    instances=tuple(ObjectInstance(**o) for o in g["instances"]),
                    salient=bool(g.get("salient", True)),
                )
                for g in data.get("groups", ())
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise InputError(f"SceneSpec: malformed object group ({exc!r})") from None
        return cls(**values)



@dataclass(frozen=True)
class SceneConfig:
    """Knobs of :func:`sample_scene` (the scene-side difficulty).

    Attributes:
        salient_groups: (min, max) object groups that captions describe.
        distractor_groups: (min, max) extra object groups never mentioned in captions.
        max_instances: cap on instances per group.
        class_cover_correlation: probability that a group's class is typical for the scene's theme
            (1 = airports have planes, 0 = any class that can physically be placed).
        secondary_cover_probability: chance of a second land cover when the theme does not need one.
        theme_weights: relative frequency of each theme (all themes equally likely when empty).
    """

    salient_groups: tuple[int, int] = (1, 3)
    distractor_groups: tuple[int, int] = (0, 1)
    max_instances: int = 10
    class_cover_correlation: float = 0.8
    secondary_cover_probability: float = 0.6
    theme_weights: tuple[tuple[str, float], ...] = ()

    def __post_init__(self) -> None:
        for name in ("salient_groups", "distractor_groups"):
            low, high = getattr(self, name)
            if not 0 <= low <= high:
                raise InputError(f"SceneConfig.{name} must be (min, max) with 0 <= min <= max, got {(low, high)}")
        if self.salient_groups[1] < 1:
            raise InputError("SceneConfig.salient_groups max must be at least 1 (captions need objects)")
        if self.max_instances < 1:
            raise InputError(f"SceneConfig.max_instances must be at least 1, got {self.max_instances}")
        for name in ("class_cover_correlation", "secondary_cover_probability"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise InputError(f"SceneConfig.{name} must be in [0, 1], got {getattr(self, name)}")
        unknown = sorted({t for t, _ in self.theme_weights} - set(THEMES))
        if unknown:
            raise InputError(f"SceneConfig.theme_weights names unknown themes {unknown}; known: {sorted(THEMES)}")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> "SceneConfig":
        fixed = fields_from_dict(cls, values)
        if "theme_weights" in fixed:
            fixed["theme_weights"] = tuple((str(t), float(w)) for t, w in fixed["theme_weights"])
        return cls(**fixed)


# --------------------------------------------------------------------------------------------------
# Sampling
# --------------------------------------------------------------------------------------------------


def pick(rng: np.random.Generator, items: Sequence[Any], weights: Sequence[float] | None = None) -> Any:
    """One element of a sequence, optionally weighted.

    ``rng.choice`` would turn strings into numpy strings; this returns the element itself.

    Args:
        rng: random source.
        items: candidates (not empty).
        weights: relative weights, one per item; uniform when ``None``.

    Returns:
        The chosen element.
    """
    if weights is None:
        return items[int(rng.integers(len(items)))]
    p = np.asarray(weights, dtype=np.float64)
    return items[int(rng.choice(len(items), p=p / p.sum()))]


def _r4(value: float) -> float:
    # Specs are rounded when created so a spec read back from JSON renders the very same image.
    return round(float(value), 4)


class _PlacementGrid:
    """A coarse raster of the scene used to keep objects on their land cover and apart from each other."""

    def __init__(self, spec: SceneSpec, cells: int = 128) -> None:
        self.cells = cells
        centres = (np.arange(cells) + 0.5) / cells
        secondary = spec.secondary_mask(centres[None, :], centres[:, None])  # [row=y, col=x]
        # Integer cover codes (indices into LAND_COVERS): np.isin on strings would dominate sampling time.
        self.codes = np.full((cells, cells), LAND_COVERS.index(spec.land_cover), dtype=np.int8)
        if spec.secondary_cover is not None:
            self.codes[secondary] = LAND_COVERS.index(spec.secondary_cover)
        self.occupied = np.zeros((cells, cells), dtype=bool)

    def on_covers(self, covers: Sequence[str]) -> np.ndarray:
        return np.isin(self.codes, [LAND_COVERS.index(c) for c in covers])

    def cover_fraction(self, covers: Sequence[str]) -> float:
        return float(self.on_covers(covers).mean())

    def footprint(self, inst: ObjectInstance, pad: float = 0.006) -> tuple[slice, slice, np.ndarray] | None:
        """Cells covered by the instance's oriented rectangle (``None`` when it leaves the image)."""
        theta = math.radians(inst.angle)
        c, s = math.cos(theta), math.sin(theta)
        half_l, half_w = inst.length / 2 + pad, inst.width / 2 + pad
        ext_x = abs(c) * half_l + abs(s) * half_w
        ext_y = abs(s) * half_l + abs(c) * half_w
        margin = 0.01
        if min(inst.cx - ext_x, inst.cy - ext_y) < margin or max(inst.cx + ext_x, inst.cy + ext_y) > 1 - margin:
            return None
        n = self.cells
        cols = slice(int((inst.cx - ext_x) * n), int((inst.cx + ext_x) * n) + 1)
        rows = slice(int((inst.cy - ext_y) * n), int((inst.cy + ext_y) * n) + 1)
        xs = (np.arange(cols.start, cols.stop) + 0.5) / n - inst.cx
        ys = (np.arange(rows.start, rows.stop) + 0.5) / n - inst.cy
        u = xs[None, :] * c + ys[:, None] * s
        v = -xs[None, :] * s + ys[:, None] * c
        inside = (np.abs(u) <= half_l) & (np.abs(v) <= half_w)
        # Tiny objects may miss every cell centre; the centre cell always counts.
        inside[int(inst.cy * n) - rows.start, int(inst.cx * n) - cols.start] = True
        return rows, cols, inside

    def fits(self, inst: ObjectInstance, covers: Sequence[str] | None, min_cover: float = 0.9) -> bool:
        area = self.footprint(inst)
        if area is None:
            return False
        rows, cols, inside = area
        if (self.occupied[rows, cols] & inside).any():
            return False
        if covers is None:
            return True
        on_cover = np.isin(self.codes[rows, cols][inside], [LAND_COVERS.index(c) for c in covers])
        return bool(on_cover.mean() >= min_cover)

    def occupy(self, inst: ObjectInstance) -> None:
        area = self.footprint(inst)
        if area is not None:
            rows, cols, inside = area
            self.occupied[rows, cols] |= inside

    def random_point(
        self, rng: np.random.Generator, covers: Sequence[str], near: Sequence[str] = ()
    ) -> tuple[float, float] | None:
        """A random free point on one of ``covers`` (and, with ``near``, within reach of those covers)."""
        ok = self.on_covers(covers) & ~self.occupied
        if near:
            ok &= _dilate(self.on_covers(near), self.cells // 20)
        candidates = np.flatnonzero(ok)
        if candidates.size == 0:
            return None
        cell = int(candidates[int(rng.integers(candidates.size))])
        row, col = divmod(cell, self.cells)
        return (col + rng.random()) / self.cells, (row + rng.random()) / self.cells


def _dilate(mask: np.ndarray, radius: int) -> np.ndarray:
    """Binary dilation by a square of side ``2 * radius + 1`` (separable max over shifts)."""
    out = mask.copy()
    for axis in (0, 1):
        grown = out.copy()
        for shift in range(1, radius + 1):
            for sign in (1, -1):
                shifted = np.roll(out, sign * shift, axis=axis)
                # np.roll wraps around; clear the wrapped border so nothing leaks across edges.
                edge = [slice(None)] * 2
                edge[axis] = slice(0, shift) if sign > 0 else slice(-shift, None)
                shifted[tuple(edge)] = False
                grown |= shifted
        out = grown
    return out


def _placeable(label: str, spec: SceneSpec, grid: _PlacementGrid) -> bool:
    if label == "bridge":
        return spec.layout in RIVER_LAYOUTS
    if label == "harbor":
        land = [c for c in spec.covers_present if c != "water"]
        return "water" in spec.covers_present and bool(land) and spec.layout in HALF_LAYOUTS
    return grid.cover_fraction(CLASS_STYLES[label].covers) >= 0.12


def _sized_instance(
    rng: np.random.Generator, base: tuple[float, float], cx: float, cy: float, angle: float
) -> ObjectInstance:
    jitter = 1 + rng.uniform(-0.06, 0.06)
    return ObjectInstance(_r4(cx), _r4(cy), _r4(base[0] * jitter), _r4(base[1] * jitter), _r4(angle % 360))


def _arrangement_offsets(
    arrangement: str, count: int, base: tuple[float, float], label: str, rng: np.random.Generator
) -> list[tuple[float, float, float]]:
    """Offsets (dx, dy, angle) of a group's instances around its anchor."""
    length, width = base
    heading = float(rng.choice([0.0, 90.0])) + rng.normal(0, 4) if rng.random() < 0.6 else rng.uniform(0, 180)
    # Side by side across the row for most classes; round tanks and pools just line up.
    across = label not in ("storage-tank", "swimming-pool", "ship")
    pitch = (width if across else length) * 1.3 + 0.01
    object_angle = heading + (90.0 if across else 0.0)
    h = math.radians(heading)
    ax, ay = math.cos(h), math.sin(h)
    if arrangement == "grid" and count >= 4:
        cols = int(math.ceil(math.sqrt(count)))
        row_pitch = (length if across else width) * 1.4 + 0.012
        slots = [((i % cols) - (cols - 1) / 2, (i // cols) - (math.ceil(count / cols) - 1) / 2) for i in range(count)]
        offsets = [
            (a * pitch * ax - b * row_pitch * ay, a * pitch * ay + b * row_pitch * ax, object_angle) for a, b in slots
        ]
    elif arrangement == "scatter" and count > 1:
        radius = 0.06 + 0.05 * math.sqrt(count)
        offsets = []
        for _ in range(count):
            r, t = radius * math.sqrt(rng.random()), rng.uniform(0, 2 * math.pi)
            offsets.append((r * math.cos(t), r * math.sin(t), rng.uniform(0, 360)))
    else:
        offsets = [
            ((i - (count - 1) / 2) * pitch * ax, (i - (count - 1) / 2) * pitch * ay, object_angle) for i in range(count)
        ]
    if label in ("plane", "helicopter", "large-vehicle", "small-vehicle", "ship") and rng.random() < 0.5:
        # Vehicles in a row face the same way, but which way is arbitrary.
        offsets = [(dx, dy, a + 180) for dx, dy, a in offsets]
    return offsets


def _place_regular_group(
    rng: np.random.Generator, label: str, count: int, spec: SceneSpec, grid: _PlacementGrid
) -> list[ObjectInstance]:
    style = CLASS_STYLES[label]
    length = rng.uniform(*style.length)
    base = (length, length * rng.uniform(*style.aspect))
    arrangement = pick(rng, style.arrangements)
    best: list[ObjectInstance] = []
    for _attempt in range(8):
        anchor = grid.random_point(rng, style.covers)
        if anchor is None:
            break
        offsets = _arrangement_offsets(arrangement, count, base, label, rng)
        placed: list[ObjectInstance] = []
        for dx, dy, angle in offsets:
            cx, cy = anchor[0] + dx, anchor[1] + dy
            if label == "ship" and spec.layout in RIVER_LAYOUTS:
                angle = _river_heading(spec, cx, cy) + float(rng.choice([0.0, 180.0]))
            inst = _sized_instance(rng, base, cx, cy, angle)
            if grid.fits(inst, style.covers) and not any(_overlap(inst, other) for other in placed):
                placed.append(inst)
        if len(placed) > len(best):
            best = placed
        if len(best) >= max(1, math.ceil(0.6 * count)):
            break
    return best


def _overlap(a: ObjectInstance, b: ObjectInstance) -> bool:
    # Instances of one group are checked against each other before they reach the grid.
    return math.hypot(a.cx - b.cx, a.cy - b.cy) < 0.45 * (min(a.length, a.width) + min(b.length, b.width))


def _river_heading(spec: SceneSpec, cx: float, cy: float) -> float:
    along, _ = spec.river_coordinates(np.asarray(cx), np.asarray(cy))
    return spec.river_point(float(along))[1]


def _place_bridges(rng: np.random.Generator, count: int, spec: SceneSpec, grid: _PlacementGrid) -> list[ObjectInstance]:
    style = CLASS_STYLES["bridge"]
    width = rng.uniform(*style.aspect) * 0.9
    span = (-0.55, 0.55) if spec.layout == "river-diagonal" else (0.15, 0.85)
    placed: list[ObjectInstance] = []
    for _attempt in range(12):
        if len(placed) == count:
            break
        along = rng.uniform(*span)
        (cx, cy), heading = spec.river_point(along)
        inst = _sized_instance(rng, (spec.extent * 1.8, width), cx, cy, heading + 90 + rng.normal(0, 4))
        if grid.fits(inst, None) and all(math.hypot(inst.cx - p.cx, inst.cy - p.cy) > 0.25 for p in placed):
            placed.append(inst)
    return placed


def _place_harbor(rng: np.random.Generator, spec: SceneSpec, grid: _PlacementGrid) -> list[ObjectInstance]:
    style = CLASS_STYLES["harbor"]
    land = [c for c in spec.covers_present if c != "water"]
    angles = np.linspace(0, 2 * np.pi, 16, endpoint=False)
    steps = np.linspace(0.0, 0.1, 21)
    for _attempt in range(12):
        point = grid.random_point(rng, ["water"], near=land)
        if point is None:
            return []
        # Seaward direction: the mean of the directions in which water lies 0.08 away.
        wet = spec.secondary_mask(point[0] + 0.08 * np.cos(angles), point[1] + 0.08 * np.sin(angles))
        wet = wet if spec.secondary_cover == "water" else ~wet
        if wet.all() or not wet.any():
            continue
        seaward = math.atan2(float(np.sin(angles[wet]).sum()), float(np.cos(angles[wet]).sum()))
        # Walk landward to the shore so the quay sits on it and the piers reach into the water.
        probe = spec.cover_at(point[0] - steps * math.cos(seaward), point[1] - steps * math.sin(seaward))
        dry = np.flatnonzero(probe != "water")
        if dry.size == 0:
            continue
        shore = (point[0] - steps[dry[0]] * math.cos(seaward), point[1] - steps[dry[0]] * math.sin(seaward))
        length = rng.uniform(*style.length)
        depth = length * rng.uniform(*style.aspect)
        cx = shore[0] + math.cos(seaward) * depth * 0.4
        cy = shore[1] + math.sin(seaward) * depth * 0.4
        inst = ObjectInstance(_r4(cx), _r4(cy), _r4(length), _r4(depth), _r4((math.degrees(seaward) - 90) % 360))
        if grid.fits(inst, ["water"], min_cover=0.6):
            return [inst]
    return []


def _place_group(
    rng: np.random.Generator, label: str, spec: SceneSpec, grid: _PlacementGrid, max_instances: int
) -> list[ObjectInstance]:
    style = CLASS_STYLES[label]
    count = int(rng.integers(style.count[0], min(style.count[1], max(style.count[0], max_instances)) + 1))
    if label == "bridge":
        placed = _place_bridges(rng, count, spec, grid)
    elif label == "harbor":
        placed = _place_harbor(rng, spec, grid)
    else:
        placed = _place_regular_group(rng, label, count, spec, grid)
    for inst in placed:
        grid.occupy(inst)
    return placed


def _choose_class(rng: np.random.Generator, theme: Theme, candidates: list[str], correlation: float) -> str | None:
    typical = [c for c in candidates if c in theme.classes]
    if typical and rng.random() < correlation:
        return pick(rng, typical, [theme.classes[c] for c in typical])
    return pick(rng, candidates) if candidates else None


def _group_colour(rng: np.random.Generator, label: str) -> tuple[str, tuple[int, int, int]]:
    name = pick(rng, CLASS_STYLES[label].colours)
    base = _CLASS_COLOUR_OVERRIDES.get((label, name), COLOURS[name])
    # Mostly brightness jitter: per-channel jitter would tint greys and whites.
    jitter = rng.integers(-10, 11) + rng.integers(-3, 4, size=3)
    return name, tuple(int(np.clip(b + j, 0, 255)) for b, j in zip(base, jitter, strict=True))


def _sample_land(rng: np.random.Generator, theme_name: str, config: SceneConfig) -> SceneSpec:
    theme = THEMES[theme_name]
    primary = pick(rng, theme.primary)
    secondaries = [c for c in theme.secondary if c != primary]
    layout, secondary = "full", None
    if secondaries and (theme.secondary_required or rng.random() < config.secondary_cover_probability):
        secondary = pick(rng, secondaries)
        # A band of grass is no river: river layouts only carry water.
        layout = pick(rng, [lay for lay in theme.layouts if secondary == "water" or lay not in RIVER_LAYOUTS])
    if layout in HALF_LAYOUTS:
        boundary, extent = rng.uniform(0.3, 0.55), 0.0
    elif layout in RIVER_LAYOUTS:
        boundary, extent = rng.uniform(0.35, 0.65), rng.uniform(0.12, 0.22)
    elif layout == "centre":
        boundary, extent = 0.5, rng.uniform(0.2, 0.32)
    else:
        boundary, extent = 0.0, 0.0
    amplitude = rng.uniform(0.0, 0.06) if layout != "centre" else rng.uniform(0.05, 0.2)
    return SceneSpec(
        theme=theme_name,
        land_cover=primary,
        secondary_cover=secondary,
        layout=layout,
        boundary=_r4(boundary),
        extent=_r4(extent),
        wave_amplitude=_r4(amplitude),
        wave_frequency=int(rng.integers(1, 4)),
        wave_phase=_r4(rng.uniform(0, 2 * math.pi)),
        texture_seed=int(rng.integers(0, 2**31 - 1)),
    )


def sample_scene(rng: np.random.Generator, config: SceneConfig | None = None) -> SceneSpec:
    """Draw a random, physically plausible scene.

    Args:
        rng: the random source; the same generator state gives the same scene.
        config: sampling knobs; defaults to :class:`SceneConfig()`.

    Returns:
        A spec with at least one salient object group whenever one can be placed.
    """
    config = config or SceneConfig()
    names = list(THEMES)
    weights_by_name = dict(config.theme_weights)
    weights = [weights_by_name.get(n, 1.0 if not weights_by_name else 0.0) for n in names]
    spec = _sample_land(rng, pick(rng, names, weights), config)
    theme = THEMES[spec.theme]
    grid = _PlacementGrid(spec)
    n_salient = int(rng.integers(max(1, config.salient_groups[0]), config.salient_groups[1] + 1))
    n_distractor = int(rng.integers(config.distractor_groups[0], config.distractor_groups[1] + 1))
    candidates = [c for c in OBJECT_CLASSES if _placeable(c, spec, grid)]
    groups: list[ObjectGroup] = []
    for salient in [True] * n_salient + [False] * n_distractor:
        # A few tries: a class can fail to fit once bigger objects have taken the room.
        for _try in range(3):
            label = _choose_class(rng, theme, candidates, config.class_cover_correlation if salient else 0.5)
            if label is None:
                break
            candidates.remove(label)  # one group per class keeps "the planes" unambiguous
            instances = _place_group(rng, label, spec, grid, config.max_instances)
            if instances:
                colour, rgb = _group_colour(rng, label)
                groups.append(ObjectGroup(label, colour, rgb, tuple(instances), salient))
                break
    groups.sort(key=lambda g: CLASS_STYLES[g.label].layer)  # stable: keeps sampling order within a layer
    return dataclasses.replace(spec, groups=tuple(groups))


# --------------------------------------------------------------------------------------------------
# Object geometry (local frame: u along the length, v along the width, both in image-side units)
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Part:
    """One drawing primitive in the object's local frame."""

    points: np.ndarray  # [n, 2] (u, v)
    fill: tuple[int, int, int, int]
    body: bool = True  # part of the object's extent (its detection box); False for wakes and access roads
    line_width: float = 0.0  # > 0: draw an open polyline of this width instead of a filled polygon


def _rect(u0: float, v0: float, u1: float, v1: float) -> np.ndarray:
    return np.array([(u0, v0), (u1, v0), (u1, v1), (u0, v1)], dtype=np.float64)


def _ellipse(cu: float, cv: float, ru: float, rv: float, n: int = 28) -> np.ndarray:
    t = np.linspace(0, 2 * np.pi, n, endpoint=False)
    return np.stack([cu + ru * np.cos(t), cv + rv * np.sin(t)], axis=1)


def _sector(radius: float, start: float, stop: float, n: int = 18) -> np.ndarray:
    t = np.linspace(start, stop, n)
    return np.vstack([[0.0, 0.0], np.stack([radius * np.cos(t), radius * np.sin(t)], axis=1)])


def _stadium(length: float, width: float, n: int = 14) -> np.ndarray:
    r = width / 2
    straight = max(length / 2 - r, 0.0)
    right = np.linspace(-np.pi / 2, np.pi / 2, n)
    left = right + np.pi
    return np.vstack(
        [
            np.stack([straight + r * np.cos(right), r * np.sin(right)], 1),
            np.stack([-straight + r * np.cos(left), r * np.sin(left)], 1),
        ]
    )


def _closed(points: np.ndarray) -> np.ndarray:
    """The polygon's points with the first repeated at the end (for outlines drawn as lines)."""
    return np.vstack([points, points[:1]])


def _mirror(points: np.ndarray) -> np.ndarray:
    return points * np.array([1.0, -1.0])


def _shade(rgb: Sequence[int], factor: float, alpha: int = 255) -> tuple[int, int, int, int]:
    return tuple(int(np.clip(c * factor, 0, 255)) for c in rgb) + (alpha,)  # type: ignore[return-value]


def _line(points: Sequence[tuple[float, float]], width: float, fill: tuple[int, int, int, int] = _WHITE) -> _Part:
    return _Part(np.asarray(points, dtype=np.float64), fill, body=False, line_width=width)


def _parts_plane(L: float, W: float, rgb: Sequence[int]) -> list[_Part]:
    body, dark = _shade(rgb, 1.0), _shade(rgb, 0.8)
    fuselage = np.array([(0.5, 0), (0.42, 0.05), (-0.44, 0.045), (-0.5, 0), (-0.44, -0.045), (0.42, -0.05)]) * [L, L]
    wing = np.array([(0.12 * L, 0.04 * L), (-0.1 * L, 0.5 * W), (-0.2 * L, 0.5 * W), (-0.08 * L, 0.04 * L)])
    tail = np.array([(-0.33 * L, 0.03 * L), (-0.45 * L, 0.2 * W), (-0.5 * L, 0.2 * W), (-0.45 * L, 0.03 * L)])
    engine = _rect(-0.02 * L, 0.17 * W, 0.08 * L, 0.22 * W)
    return [
        _Part(wing, dark),
        _Part(_mirror(wing), dark),
        _Part(tail, dark),
        _Part(_mirror(tail), dark),
        _Part(engine, _shade(rgb, 0.6)),
        _Part(_mirror(engine), _shade(rgb, 0.6)),
        _Part(fuselage, body),
    ]


def _parts_ship(L: float, W: float, rgb: Sequence[int]) -> list[_Part]:
    hull = np.array(
        [(0.5 * L, 0), (0.28 * L, 0.5 * W), (-0.5 * L, 0.45 * W), (-0.5 * L, -0.45 * W), (0.28 * L, -0.5 * W)]
    )
    wake = np.array([(-0.5 * L, 0.35 * W), (-0.8 * L, 0.7 * W), (-0.8 * L, -0.7 * W), (-0.5 * L, -0.35 * W)])
    return [
        _Part(wake, (220, 230, 236, 38), body=False),
        _Part(hull, _shade(rgb, 1.0)),
        _Part(_rect(-0.42 * L, -0.3 * W, -0.12 * L, 0.3 * W), _shade(rgb, 0.7)),
        _Part(_rect(0.0, -0.2 * W, 0.2 * L, 0.2 * W), _shade(rgb, 0.85)),
    ]


def _parts_storage_tank(L: float, W: float, rgb: Sequence[int]) -> list[_Part]:
    return [
        _Part(_ellipse(0, 0, L / 2, L / 2), _shade(rgb, 0.9)),
        _Part(_ellipse(0, 0, L * 0.42, L * 0.42), _shade(rgb, 1.05)),
        _Part(_ellipse(-0.08 * L, -0.08 * L, L * 0.12, L * 0.12), _shade(rgb, 0.75), body=False),
    ]


def _parts_baseball_diamond(L: float, W: float, rgb: Sequence[int]) -> list[_Part]:
    # Home plate at the local origin's back corner; the fan opens along +u.
    fan = _sector(L, -np.pi / 4, np.pi / 4) - [L / 2, 0]
    infield = _sector(L * 0.5, -np.pi / 4, np.pi / 4) - [L / 2, 0]
    d = L * 0.26
    diamond = np.array([(0, 0), (d * 0.707, d * 0.707), (d * 1.414, 0), (d * 0.707, -d * 0.707)]) - [
        L / 2 - 0.02 * L,
        0,
    ]
    return [
        _Part(fan, (78, 140, 64, 255)),
        _Part(infield, _shade(rgb, 1.0)),
        _Part(diamond, (92, 156, 76, 255)),
        _line(fan[[1, 0, -1]], 0.006),
    ]


def _parts_court(L: float, W: float, rgb: Sequence[int], basketball: bool) -> list[_Part]:
    parts = [
        _Part(_rect(-L / 2, -W / 2, L / 2, W / 2), _shade(rgb, 0.75)),
        _Part(_rect(-0.4 * L, -0.36 * W, 0.4 * L, 0.36 * W), _shade(rgb, 1.0)),
    ]
    lw = 0.004
    parts.append(
        _line(
            [
                (-0.4 * L, -0.36 * W),
                (0.4 * L, -0.36 * W),
                (0.4 * L, 0.36 * W),
                (-0.4 * L, 0.36 * W),
                (-0.4 * L, -0.36 * W),
            ],
            lw,
        )
    )
    parts.append(_line([(0, -0.36 * W), (0, 0.36 * W)], lw))
    if basketball:
        parts.append(_Part(_ellipse(0, 0, 0.08 * L, 0.08 * L), _WHITE, body=False))
        parts.append(_Part(_ellipse(0, 0, 0.06 * L, 0.06 * L), _shade(rgb, 1.0), body=False))
        for sign in (1, -1):
            parts.append(_Part(_rect(sign * 0.4 * L, -0.1 * W, sign * 0.26 * L, 0.1 * W), _shade(rgb, 0.8), body=False))
    else:
        parts.append(_line([(-0.22 * L, -0.36 * W), (-0.22 * L, 0.36 * W)], lw))
        parts.append(_line([(0.22 * L, -0.36 * W), (0.22 * L, 0.36 * W)], lw))
        parts.append(_line([(-0.22 * L, 0), (0.22 * L, 0)], lw))
    return parts


def _parts_track_field(L: float, W: float, rgb: Sequence[int]) -> list[_Part]:
    return [
        _Part(_stadium(L, W), _shade(rgb, 1.0)),
        _line(_closed(_stadium(L * 0.9, W * 0.82)), 0.003),
        _Part(_stadium(L * 0.8, W * 0.64), (74, 150, 70, 255)),
        _Part(_rect(-0.28 * L, -0.22 * W, 0.28 * L, 0.22 * W), (86, 162, 78, 255), body=False),
    ]


def _parts_harbor(L: float, W: float, rgb: Sequence[int]) -> list[_Part]:
    quay = _rect(-L / 2, -W / 2, L / 2, -0.3 * W)
    piers = [
        _Part(_rect(u - 0.025 * L, -0.32 * W, u + 0.025 * L, W / 2), _shade(rgb, 0.92))
        for u in np.linspace(-0.38 * L, 0.38 * L, 4)
    ]
    return [_Part(quay, _shade(rgb, 1.0))] + piers


def _parts_bridge(L: float, W: float, rgb: Sequence[int]) -> list[_Part]:
    return [
        _Part(_rect(-L / 2, -W / 2, L / 2, W / 2), _shade(rgb, 1.0)),
        _line([(-L / 2, -0.4 * W), (L / 2, -0.4 * W)], 0.003, _shade(rgb, 0.6)),
        _line([(-L / 2, 0.4 * W), (L / 2, 0.4 * W)], 0.003, _shade(rgb, 0.6)),
    ]


def _parts_vehicle(L: float, W: float, rgb: Sequence[int], large: bool) -> list[_Part]:
    if large:
        return [
            _Part(_rect(-L / 2, -W / 2, 0.28 * L, W / 2), _shade(rgb, 1.0)),
            _Part(_rect(0.31 * L, -0.45 * W, L / 2, 0.45 * W), _shade(rgb, 0.8)),
        ]
    return [
        _Part(_stadium(L, W), _shade(rgb, 1.0)),
        _Part(_rect(0.08 * L, -0.36 * W, 0.24 * L, 0.36 * W), (40, 48, 60, 255), body=False),
    ]


def _parts_helicopter(L: float, W: float, rgb: Sequence[int]) -> list[_Part]:
    rotor = (50, 50, 54, 200)
    return [
        _Part(_rect(-0.5 * L, -0.04 * L, -0.05 * L, 0.04 * L), _shade(rgb, 0.85)),
        _Part(_rect(-0.5 * L, -0.12 * L, -0.44 * L, 0.12 * L), _shade(rgb, 0.85)),
        _Part(_ellipse(0.12 * L, 0, 0.24 * L, 0.13 * L), _shade(rgb, 1.0)),
        _line([(0.12 * L - 0.5 * W * 0.7, -0.5 * W * 0.7), (0.12 * L + 0.5 * W * 0.7, 0.5 * W * 0.7)], 0.008, rotor),
        _line([(0.12 * L - 0.5 * W * 0.7, 0.5 * W * 0.7), (0.12 * L + 0.5 * W * 0.7, -0.5 * W * 0.7)], 0.008, rotor),
    ]


def _parts_roundabout(L: float, W: float, rgb: Sequence[int]) -> list[_Part]:
    roads = [
        _Part(
            _rect(0, -0.09 * L, 0.95 * L, 0.09 * L)
            @ np.array([[math.cos(a), math.sin(a)], [-math.sin(a), math.cos(a)]]),
            _ASPHALT,
            body=False,
        )
        for a in (0.0, math.pi / 2, math.pi, 1.5 * math.pi)
    ]
    return roads + [
        _Part(_ellipse(0, 0, L / 2, L / 2), _ASPHALT),
        _line(_closed(_ellipse(0, 0, 0.4 * L, 0.4 * L)), 0.002),
        _Part(_ellipse(0, 0, 0.3 * L, 0.3 * L), (84, 148, 70, 255)),
    ]


def _parts_soccer(L: float, W: float, rgb: Sequence[int]) -> list[_Part]:
    stripes = [
        _Part(_rect(u, -W / 2, u + L / 8, W / 2), _shade(rgb, 1.08), body=False)
        for u in np.arange(-L / 2, L / 2, L / 4)
    ]
    lw = 0.004
    box = [(-0.45 * L, -0.22 * W), (-0.3 * L, -0.22 * W), (-0.3 * L, 0.22 * W), (-0.45 * L, 0.22 * W)]
    return (
        [_Part(_rect(-L / 2, -W / 2, L / 2, W / 2), _shade(rgb, 0.95))]
        + stripes
        + [
            _line(
                [
                    (-0.45 * L, -0.42 * W),
                    (0.45 * L, -0.42 * W),
                    (0.45 * L, 0.42 * W),
                    (-0.45 * L, 0.42 * W),
                    (-0.45 * L, -0.42 * W),
                ],
                lw,
            ),
            _line([(0, -0.42 * W), (0, 0.42 * W)], lw),
            _line(_closed(_ellipse(0, 0, 0.09 * L, 0.09 * L)), lw),
            _line(box, lw),
            _line(_mirror(np.asarray(box)) * [-1, 1], lw),
        ]
    )


def _parts_pool(L: float, W: float, rgb: Sequence[int]) -> list[_Part]:
    return [
        _Part(_rect(-L / 2, -W / 2, L / 2, W / 2), (214, 210, 198, 255)),
        _Part(_rect(-0.42 * L, -0.38 * W, 0.42 * L, 0.38 * W), _shade(rgb, 1.0)),
        _Part(_rect(-0.42 * L, -0.38 * W, -0.2 * L, 0.38 * W), _shade(rgb, 1.12), body=False),
    ]


_SHAPES: Mapping[str, Callable[[float, float, Sequence[int]], list[_Part]]] = MappingProxyType(
    {
        "plane": _parts_plane,
        "ship": _parts_ship,
        "storage-tank": _parts_storage_tank,
        "baseball-diamond": _parts_baseball_diamond,
        "tennis-court": lambda L, W, rgb: _parts_court(L, W, rgb, basketball=False),
        "basketball-court": lambda L, W, rgb: _parts_court(L, W, rgb, basketball=True),
        "ground-track-field": _parts_track_field,
        "harbor": _parts_harbor,
        "bridge": _parts_bridge,
        "large-vehicle": lambda L, W, rgb: _parts_vehicle(L, W, rgb, large=True),
        "small-vehicle": lambda L, W, rgb: _parts_vehicle(L, W, rgb, large=False),
        "helicopter": _parts_helicopter,
        "roundabout": _parts_roundabout,
        "soccer-ball-field": _parts_soccer,
        "swimming-pool": _parts_pool,
    }
)


def _to_image(points: np.ndarray, inst: ObjectInstance) -> np.ndarray:
    """Local (u, v) points -> normalised image (x, y) points."""
    theta = math.radians(inst.angle)
    c, s = math.cos(theta), math.sin(theta)
    return np.stack(
        [inst.cx + points[:, 0] * c - points[:, 1] * s, inst.cy + points[:, 0] * s + points[:, 1] * c], axis=1
    )


def object_outline(label: str, inst: ObjectInstance) -> np.ndarray:
    """Normalised image points of an object's body (what its detection box encloses).

    Args:
        label: the object class.
        inst: the instance.

    Returns:
        float64 [n, 2] (x, y) points in ``[0, 1]`` image coordinates (before clipping).
    """
    parts = _SHAPES[label](inst.length, inst.width, (128, 128, 128))
    return _to_image(np.vstack([p.points for p in parts if p.body]), inst)


# --------------------------------------------------------------------------------------------------
# Rendering
# --------------------------------------------------------------------------------------------------

_COVER_BASE: Mapping[str, tuple[int, int, int]] = MappingProxyType(
    {
        "water": (34, 66, 98),
        "grass": (92, 138, 64),
        "bare-soil": (152, 124, 94),
        "urban": (128, 126, 124),
        "forest": (42, 82, 40),
        "desert": (214, 184, 136),
    }
)


def _smooth_noise(rng: np.random.Generator, size: int, cells: int) -> np.ndarray:
    """Value noise in [-1, 1]: a (cells+1)^2 random grid upsampled bicubically to size x size."""
    grid = rng.random((cells + 1, cells + 1)).astype(np.float32) * 2 - 1
    return np.asarray(Image.fromarray(grid).resize((size, size), Image.Resampling.BICUBIC))


def _fractal_noise(rng: np.random.Generator, size: int, base_cells: int, octaves: int = 3) -> np.ndarray:
    total = np.zeros((size, size), dtype=np.float32)
    for octave in range(octaves):
        total += _smooth_noise(rng, size, base_cells * 2**octave) * 0.5**octave
    return total / (2 - 0.5 ** (octaves - 1))


def _blocks(rng: np.random.Generator, size: int, cells: int, values: int) -> np.ndarray:
    """Piecewise-constant integer map: cells x cells random ids upsampled with nearest neighbour."""
    grid = rng.integers(0, values, size=(cells, cells)).astype(np.uint8)
    return np.asarray(Image.fromarray(grid).resize((size, size), Image.Resampling.NEAREST))


def _texture(cover: str, size: int, rng: np.random.Generator) -> np.ndarray:
    """float32 [size, size, 3] texture of one land cover in 0..255."""
    base = np.asarray(_COVER_BASE[cover], dtype=np.float32) * (1 + rng.normal(0, 0.06, size=3)).astype(np.float32)
    coords = (np.arange(size, dtype=np.float32) + 0.5) / size
    xs, ys = coords[None, :], coords[:, None]
    low = _fractal_noise(rng, size, 3)
    if cover == "water":
        angle = rng.uniform(0, np.pi)
        ripples = np.sin((xs * np.cos(angle) + ys * np.sin(angle)) * size * 0.7 + low * 3)
        shade = 1 + 0.08 * low + 0.025 * ripples
    elif cover == "grass":
        parcels = _blocks(rng, size, int(rng.integers(2, 6)), 4).astype(np.float32)
        shade = 1 + 0.12 * low + 0.05 * (parcels - 1.5) + 0.05 * _smooth_noise(rng, size, size // 6)
    elif cover == "bare-soil":
        blotches = np.clip(_smooth_noise(rng, size, 10) - 0.3, 0, None)
        shade = 1 + 0.15 * low - 0.35 * blotches + 0.05 * _smooth_noise(rng, size, size // 5)
    elif cover == "forest":
        canopy = _smooth_noise(rng, size, size // 5)
        shade = 0.9 + 0.15 * low + 0.28 * canopy
    elif cover == "desert":
        angle = rng.uniform(0, np.pi)
        dunes = np.sin((xs * np.cos(angle) + ys * np.sin(angle)) * rng.uniform(14, 28) + low * 2.5)
        shade = 1 + 0.07 * dunes + 0.05 * low
    else:
        return _urban_texture(base, size, xs, ys, low, rng)
    return base[None, None, :] * shade[..., None]


def _urban_texture(
    base: np.ndarray, size: int, xs: np.ndarray, ys: np.ndarray, low: np.ndarray, rng: np.random.Generator
) -> np.ndarray:
    """Street blocks with houses: roads on a jittered grid, roofs of varying colour, a shadow edge."""
    blocks = rng.uniform(4, 7)
    houses = int(rng.integers(2, 4))  # houses per block side
    offset = rng.random(2)
    u, v = xs * blocks + offset[0], ys * blocks + offset[1]
    road = (np.mod(u, 1.0) < 0.12) | (np.mod(v, 1.0) < 0.12)
    hu, hv = np.mod(u, 1.0) * houses, np.mod(v, 1.0) * houses
    alley = (np.mod(hu, 1.0) < 0.12) | (np.mod(hv, 1.0) < 0.12)
    shadow = (np.mod(hu, 1.0) > 0.88) | (np.mod(hv, 1.0) > 0.88)
    roof_palette = np.array(
        [[150, 146, 140], [160, 106, 88], [116, 118, 122], [186, 182, 172], [134, 114, 100]], dtype=np.float32
    )
    ids = rng.integers(0, len(roof_palette), size=(64, 64))
    house_index_u = np.floor(u * houses).astype(np.int64) % 64
    house_index_v = np.floor(v * houses).astype(np.int64) % 64
    # One brightness factor for the whole town; per-channel factors turn roofs purple.
    image = roof_palette[ids[house_index_v, house_index_u]] * np.float32(base.mean() / 127.0)
    image = np.where(shadow[..., None], image * 0.62, image)
    image = np.where(alley[..., None], base[None, None, :] * 0.95, image)
    image = np.where(road[..., None], np.float32(84), image)
    return image * (1 + 0.06 * low)[..., None]


def _soft_mask(spec: SceneSpec, size: int) -> np.ndarray:
    coords = (np.arange(size) + 0.5) / size
    hard = spec.secondary_mask(coords[None, :], coords[:, None]).astype(np.uint8) * 255
    blurred = Image.fromarray(hard).filter(ImageFilter.GaussianBlur(radius=max(1.0, size / 160)))
    return np.asarray(blurred, dtype=np.float32) / 255.0


def _background(spec: SceneSpec, size: int, rng: np.random.Generator) -> np.ndarray:
    image = _texture(spec.land_cover, size, rng)
    if spec.secondary_cover is None:
        return image
    mask = _soft_mask(spec, size)[..., None]
    image = image * (1 - mask) + _texture(spec.secondary_cover, size, rng) * mask
    if "water" in spec.covers_present:
        # A light beach/bank line where land meets water.
        shore = np.clip(1 - np.abs(mask - 0.5) * 3, 0, 1) ** 2
        image = image * (1 - 0.5 * shore) + np.float32([196, 184, 150]) * 0.5 * shore
    return image


def _draw_instance(
    draw: ImageDraw.ImageDraw, label: str, rgb: Sequence[int], inst: ObjectInstance, scale: float
) -> None:
    parts = _SHAPES[label](inst.length, inst.width, rgb)
    height = CLASS_STYLES[label].shadow_height
    if height > 0:
        # Sun from the upper left: shadows fall down-right, longer for taller objects.
        shift = np.array([1.0, 1.0]) * height * min(inst.length, inst.width) * scale
        for part in parts:
            if part.body and part.line_width == 0:
                pts = _to_image(part.points, inst) * scale + shift
                draw.polygon([tuple(p) for p in pts], fill=(20, 22, 24, 110))
    for part in parts:
        pts = [tuple(p) for p in _to_image(part.points, inst) * scale]
        if part.line_width > 0:
            draw.line(pts, fill=part.fill, width=max(1, int(round(part.line_width * scale))))
        else:
            draw.polygon(pts, fill=part.fill)


def render_scene(spec: SceneSpec, size: int = 256) -> Image.Image:
    """Render a scene as an 8-bit RGB image.

    Args:
        spec: the scene.
        size: side of the square image in pixels.

    Returns:
        A ``size x size`` RGB ``PIL.Image``; identical pixels for identical specs.

    Raises:
        ValueError: ``size`` is smaller than 32.
    """
    if size < 32:
        raise InputError(f"render_scene: size must be at least 32 pixels, got {size}")
    rng = np.random.default_rng(spec.texture_seed)
    background = np.clip(_background(spec, size, rng), 0, 255).astype(np.uint8)
    big = Image.fromarray(background).resize((size * _SUPERSAMPLE,) * 2, Image.Resampling.NEAREST)
    draw = ImageDraw.Draw(big, "RGBA")
    for group in spec.groups:
        for inst in group.instances:
            _draw_instance(draw, group.label, group.rgb, inst, size * _SUPERSAMPLE)
    image = np.asarray(big.reduce(_SUPERSAMPLE), dtype=np.float32)
    # Sensor noise over everything, objects included.
    image += rng.normal(0, 2.5, size=image.shape).astype(np.float32)
    return Image.fromarray(np.clip(np.rint(image), 0, 255).astype(np.uint8))
