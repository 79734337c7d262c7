"""Captions for synthetic scenes from a small grammar with paraphrases, and the vocabulary built from them.

Every caption is derived from a :class:`~galr.synthetic.scenes.SceneSpec` and only states what the spec
holds: the object classes of its *salient* groups (distractor groups are never mentioned), their exact
counts when a number is used, their colours, the land covers present, the layout, and spatial
relations computed from the geometry (``left of`` compares centroids, ``next to`` the closest
instances, ``surrounded by`` checks that the other group or land cover lies all around). Paraphrases
come from synonyms (plane / aeroplane / aircraft, ship / boat / vessel, ...), vague or exact counts
and optional details. All choices are drawn from the given ``numpy.random.Generator``.

``caption_specificity`` (0..1) controls how much detail a caption carries: exact counts, colours,
positions, how many groups one caption mentions, and whether the layout is described. Lower values give
vaguer captions and a harder retrieval task.

:func:`build_vocabulary` mirrors the original ``vocab.py``: stopwords and rare words are left out, so
at encode time they become ``<unk>`` exactly as with the RSITMD/RSICD vocabularies. Unlike the
NLTK list the original uses, :data:`VOCAB_STOPWORDS` keeps spatial words (``above``, ``below``) and
count words (``few``), because here they carry the relations and counts the benchmark tests.
"""

from __future__ import annotations

import math
import re
from collections import Counter
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Iterable, Mapping, Sequence

import numpy as np

from galr.errors import InputError
from galr.preprocess.text import Vocabulary, tokenize
from galr.synthetic.scenes import (
    CLASS_STYLES,
    RIVER_LAYOUTS,
    ObjectGroup,
    SceneSpec,
    pick,
)

# (singular, plural) paraphrases of each class.
CLASS_NOUNS: Mapping[str, tuple[tuple[str, str], ...]] = MappingProxyType(
    {
        "plane": (
            ("plane", "planes"),
            ("aeroplane", "aeroplanes"),
            ("aircraft", "aircraft"),
            ("airplane", "airplanes"),
        ),
        "ship": (("ship", "ships"), ("boat", "boats"), ("vessel", "vessels")),
        "storage-tank": (("storage tank", "storage tanks"), ("oil tank", "oil tanks"), ("tank", "tanks")),
        "baseball-diamond": (("baseball field", "baseball fields"), ("baseball diamond", "baseball diamonds")),
        "tennis-court": (("tennis court", "tennis courts"),),
        "basketball-court": (("basketball court", "basketball courts"),),
        "ground-track-field": (
            ("running track", "running tracks"),
            ("ground track field", "ground track fields"),
            ("track field", "track fields"),
        ),
        "harbor": (("harbor", "harbors"), ("harbour", "harbours"), ("dock", "docks")),
        "bridge": (("bridge", "bridges"),),
        "large-vehicle": (("truck", "trucks"), ("large vehicle", "large vehicles"), ("lorry", "lorries")),
        "small-vehicle": (("car", "cars"), ("small car", "small cars"), ("small vehicle", "small vehicles")),
        "helicopter": (("helicopter", "helicopters"),),
        "roundabout": (("roundabout", "roundabouts"), ("traffic circle", "traffic circles")),
        "soccer-ball-field": (
            ("soccer field", "soccer fields"),
            ("football field", "football fields"),
            ("soccer pitch", "soccer pitches"),
        ),
        "swimming-pool": (("swimming pool", "swimming pools"), ("pool", "pools")),
    }
)

# Words that name a land cover anywhere in a caption (used to check captions against their scene).
COVER_WORDS: Mapping[str, frozenset[str]] = MappingProxyType(
    {
        "water": frozenset({"water", "sea", "river", "lake", "pond"}),
        "grass": frozenset({"grass", "grassland", "lawn", "meadow"}),
        "bare-soil": frozenset({"bare"}),
        "urban": frozenset({"urban", "city", "buildings", "town"}),
        "forest": frozenset({"forest", "trees", "woods", "woodland"}),
        "desert": frozenset({"desert", "sand", "sandy", "dunes"}),
    }
)

# Noun phrases for a land cover used as an area ("a grassland", "the bare land").
_COVER_AREAS: Mapping[str, tuple[str, ...]] = MappingProxyType(
    {
        "water": ("water", "sea"),
        "grass": ("grassland", "lawn", "meadow"),
        "bare-soil": ("bare land", "bare ground", "bare soil"),
        "urban": ("urban area", "city", "town"),
        "forest": ("forest", "woods", "woodland"),
        "desert": ("desert", "sandy desert", "sand"),
    }
)
# Where an object stands, by the cover under it.
_COVER_LOCATIONS: Mapping[str, tuple[str, ...]] = MappingProxyType(
    {
        "water": ("on the water", "in the sea", "on the sea"),
        "grass": ("on the grass", "on the lawn", "on the grassland", "in the meadow"),
        "bare-soil": ("on the bare land", "on the bare ground", "on bare soil"),
        "urban": ("in the urban area", "among the buildings", "in the city"),
        "forest": ("in the forest", "among the trees", "in the woods"),
        "desert": ("in the desert", "on the sand"),
    }
)
_WATER_BODY = MappingProxyType({"river": ("on the river", "in the river"), "lake": ("on the lake", "in the lake")})

_NUMBERS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten")
_VERBS: Mapping[str, tuple[str, ...]] = MappingProxyType(
    {
        "plane": ("parked", "standing"),
        "ship": ("sailing", "moored", "floating"),
        "helicopter": ("parked",),
        "large-vehicle": ("parked", "driving"),
        "small-vehicle": ("parked", "driving"),
        "storage-tank": ("standing", "located"),
    }
)
_SIDES = MappingProxyType(
    {"left": ("left", "right"), "right": ("right", "left"), "top": ("top", "bottom"), "bottom": ("bottom", "top")}
)
_RIVER_DIRECTIONS = MappingProxyType(
    {
        "river-horizontal": ("from left to right", "horizontally"),
        "river-vertical": ("from top to bottom", "vertically"),
        "river-diagonal": ("diagonally",),
    }
)

# Function words dropped from the vocabulary (they become <unk>, like the original's NLTK stopwords).
VOCAB_STOPWORDS: frozenset[str] = frozenset(
    "a an the is are was were be been being am there here it its this that these those of in on at to by for "
    "from with and or as which while into onto some also can very has have had 's".split()
)


@dataclass(frozen=True)
class CaptionMentions:
    """What a caption talks about (recovered by :func:`caption_mentions`).

    Attributes:
        classes: object classes named.
        covers: land covers named.
        counts: exact counts stated with a number word, per class.
    """

    classes: frozenset[str]
    covers: frozenset[str]
    counts: Mapping[str, int] = field(default_factory=dict)


def _words(text: str) -> list[str]:
    return re.findall(r"[a-z]+", text.lower())


# Class noun phrases as word tuples, longest first, so "small car" wins over "car".
_NOUN_PHRASES: tuple[tuple[tuple[str, ...], str], ...] = tuple(
    sorted(
        ((tuple(phrase.split()), label) for label, forms in CLASS_NOUNS.items() for pair in forms for phrase in pair),
        key=lambda item: -len(item[0]),
    )
)
_COLOUR_WORDS = frozenset({"white", "grey", "black", "red", "blue", "green", "orange", "yellow", "brown"})


def caption_mentions(caption: str) -> CaptionMentions:
    """Object classes, land covers and exact counts that a caption states.

    Args:
        caption: a caption produced by :func:`generate_captions` (or any English text).

    Returns:
        The mentions; a number word directly before a class noun (optionally with one colour word in
        between) is recorded as that class's count.
    """
    words = _words(caption)
    classes: set[str] = set()
    counts: dict[str, int] = {}
    i = 0
    while i < len(words):
        for phrase, label in _NOUN_PHRASES:
            if tuple(words[i : i + len(phrase)]) == phrase:
                classes.add(label)
                before = words[max(0, i - 2) : i]
                if before and before[-1] in _COLOUR_WORDS:
                    before = before[:-1]
                if before and before[-1] in _NUMBERS:
                    counts[label] = _NUMBERS.index(before[-1])
                i += len(phrase)
                break
        else:
            i += 1
    covers = {cover for cover, vocab in COVER_WORDS.items() if vocab & set(words)}
    return CaptionMentions(frozenset(classes), frozenset(covers), counts)


# --------------------------------------------------------------------------------------------------
# Geometry -> facts
# --------------------------------------------------------------------------------------------------


def _spread(group: ObjectGroup) -> float:
    cx, cy = group.centroid
    return max(math.hypot(o.cx - cx, o.cy - cy) + max(o.length, o.width) / 2 for o in group.instances)


def _gap(a: ObjectGroup, b: ObjectGroup) -> float:
    """Smallest distance between the outlines of two groups' instances (approximated by circles)."""
    return min(
        math.hypot(p.cx - q.cx, p.cy - q.cy) - max(p.length, p.width) / 2 - max(q.length, q.width) / 2
        for p in a.instances
        for q in b.instances
    )


def _surrounds(centre: tuple[float, float], points: Sequence[tuple[float, float]]) -> bool:
    """Whether the points lie all around the centre (no empty sector wider than 150 degrees)."""
    if len(points) < 3:
        return False
    angles = sorted(math.atan2(y - centre[1], x - centre[0]) for x, y in points)
    gaps = [b - a for a, b in zip(angles, angles[1:], strict=False)] + [angles[0] + 2 * math.pi - angles[-1]]
    return max(gaps) < math.radians(150)


def spatial_relations(a: ObjectGroup, b: ObjectGroup) -> tuple[str, ...]:
    """Relations that truthfully describe group ``a`` with respect to group ``b``.

    Args:
        a: the subject group.
        b: the reference group.

    Returns:
        A subset of ``("next to", "near", "left of", "right of", "above", "below", "surrounded by")``
        (``above`` means higher in the image, i.e. smaller ``y``).
    """
    relations: list[str] = []
    gap = _gap(a, b)
    if gap < 0.08:
        relations.append("next to")
    if gap < 0.18:
        relations.append("near")
    (ax, ay), (bx, by) = a.centroid, b.centroid
    dx, dy = bx - ax, by - ay
    if abs(dx) > 0.15 and abs(dx) > 1.5 * abs(dy):
        relations.append("left of" if dx > 0 else "right of")
    if abs(dy) > 0.15 and abs(dy) > 1.5 * abs(dx):
        relations.append("above" if dy > 0 else "below")
    if a.count == 1 and gap < 0.2 and _surrounds(a.centroid, [(o.cx, o.cy) for o in b.instances]):
        relations.append("surrounded by")
    return tuple(relations)


def _region(group: ObjectGroup) -> tuple[str, str] | None:
    """(vertical, horizontal) part of the image a compact group lies in, e.g. ("top", "left")."""
    if _spread(group) > 0.3:
        return None
    cx, cy = group.centroid
    horizontal = "left" if cx < 0.36 else "right" if cx > 0.64 else "centre"
    vertical = "top" if cy < 0.36 else "bottom" if cy > 0.64 else "centre"
    return vertical, horizontal


def _region_phrase(region: tuple[str, str], rng: np.random.Generator) -> str:
    vertical, horizontal = region
    if vertical == "centre" and horizontal == "centre":
        return pick(rng, ("in the middle", "in the center", "in the middle of the image"))
    if vertical == "centre":
        return pick(rng, (f"on the {horizontal} side", f"on the {horizontal}", f"in the {horizontal} part"))
    if horizontal == "centre":
        upper = "upper" if vertical == "top" else "lower"
        return pick(rng, (f"at the {vertical}", f"in the {upper} part", f"at the {vertical} of the image"))
    return pick(rng, (f"in the {vertical} {horizontal} corner", f"at the {vertical} {horizontal}"))


def _group_cover(spec: SceneSpec, group: ObjectGroup) -> str:
    covers = spec.cover_at(np.array([o.cx for o in group.instances]), np.array([o.cy for o in group.instances]))
    values, counts = np.unique(covers.astype(str), return_counts=True)
    return str(values[int(np.argmax(counts))])


def _surrounding_cover(spec: SceneSpec, group: ObjectGroup) -> str | None:
    """The single land cover all around a group, if it is enclosed by one (e.g. a field among buildings)."""
    cx, cy = group.centroid
    radius = _spread(group) + 0.06
    angles = np.linspace(0, 2 * np.pi, 24, endpoint=False)
    xs, ys = cx + radius * np.cos(angles), cy + radius * np.sin(angles)
    inside = (xs > 0) & (xs < 1) & (ys > 0) & (ys < 1)
    if inside.mean() < 0.75:
        return None
    covers = set(spec.cover_at(xs[inside], ys[inside]).tolist())
    return covers.pop() if len(covers) == 1 else None


def _water_body(spec: SceneSpec) -> str:
    if spec.layout in RIVER_LAYOUTS:
        return "river"
    if spec.layout == "centre" and spec.secondary_cover == "water":
        return "lake"
    return "sea"


# --------------------------------------------------------------------------------------------------
# Phrases
# --------------------------------------------------------------------------------------------------


class _Phraser:
    """Builds phrases for one scene with one rng and one specificity."""

    def __init__(self, spec: SceneSpec, rng: np.random.Generator, specificity: float) -> None:
        self.spec = spec
        self.rng = rng
        self.specificity = specificity

    def chance(self, p: float) -> bool:
        return bool(self.rng.random() < p)

    def detail(self) -> bool:
        """Whether to add an optional detail (more often at high specificity)."""
        return self.chance(0.15 + 0.8 * self.specificity)

    def count(self, n: int) -> str:
        if n == 1:
            return pick(self.rng, ("a", "a", "one"))
        if n <= 6 and self.detail():
            return _NUMBERS[n]
        vague = (
            ["some"]
            + (["a few"] if n <= 4 else [])
            + (["several"] if 3 <= n <= 9 else [])
            + (["many", "lots of"] if n >= 6 else [])
        )
        return pick(self.rng, vague)

    def noun(self, label: str, n: int) -> str:
        singular, plural = pick(self.rng, CLASS_NOUNS[label])
        return singular if n == 1 else plural

    def group(self, group: ObjectGroup, with_count: bool = True) -> str:
        """'three white planes', 'a bridge', 'the boats'."""
        words = [self.count(group.count) if with_count else "the"]
        if CLASS_STYLES[group.label].colour_in_captions and self.chance(0.1 + 0.7 * self.specificity):
            words.append(group.colour)
        words.append(self.noun(group.label, group.count))
        return " ".join(words)

    def area(self, cover: str, article: str = "a") -> str:
        noun = pick(self.rng, _COVER_AREAS[cover])
        if cover == "water":
            return "the " + noun if noun == "sea" else noun
        if cover == "forest" and self.chance(0.4):
            noun = "dense " + noun
        if article == "a" and noun.split()[-1] in ("land", "ground", "soil", "sand", "water", "woods"):
            return noun  # uncountable or plural: no indefinite article
        return f"{article} {noun}"

    def location(self, group: ObjectGroup) -> str:
        """Where a group stands: on which cover, by the water, over the river..."""
        label, spec = group.label, self.spec
        if label == "bridge":
            return pick(self.rng, ("over the river", "across the river"))
        if label == "harbor":
            return pick(self.rng, ("on the coast", "along the shore", "by the water"))
        cover = _group_cover(spec, group)
        if cover == "water" and _water_body(spec) != "sea":
            return pick(self.rng, _WATER_BODY[_water_body(spec)])
        options = list(_COVER_LOCATIONS[cover])
        if label == "plane":
            options.append("at the airport")
        if label == "ship" and any(g.label == "harbor" and g.salient for g in spec.groups):
            options.append("in the port")
        return pick(self.rng, options)

    def be(self, n: int) -> str:
        return "is" if n == 1 else "are"

    def scene_overview(self) -> str:
        """A noun phrase for the land covers and their layout."""
        spec, rng = self.spec, self.rng
        primary, secondary = spec.land_cover, spec.secondary_cover
        if secondary is None:
            return self.area(primary)
        if spec.layout in RIVER_LAYOUTS:
            return pick(rng, (f"a river running through {self.area(primary)}", f"{self.area(primary)} with a river"))
        if spec.layout == "centre":
            inner = "a lake" if secondary == "water" else f"a patch of {pick(rng, _COVER_AREAS[secondary])}"
            return f"{inner} in the middle of {self.area(primary, 'the')}"
        side = _SIDES[spec.layout][0]
        return pick(
            rng,
            (
                f"{self.area(primary)} next to {self.area(secondary)}",
                f"{self.area(primary)} with {self.area(secondary)} on the {side}",
            ),
        )


# --------------------------------------------------------------------------------------------------
# Sentence templates: each returns a sentence, or None when it does not apply to the scene
# --------------------------------------------------------------------------------------------------


def _sentence_group(p: _Phraser, group: ObjectGroup) -> str:
    rng, n = p.rng, group.count
    region = _region(group) if p.detail() else None
    tail = p.location(group)
    if region is not None:
        tail = f"{tail} {_region_phrase(region, rng)}"
    if group.label == "bridge":
        verb = "crosses" if n == 1 else "cross"
        return pick(rng, (f"{p.group(group)} {verb} the river", f"there {p.be(n)} {p.group(group)} {tail}"))
    surrounding = _surrounding_cover(p.spec, group)
    if surrounding is not None and surrounding != _group_cover(p.spec, group) and p.chance(0.5):
        # Only when the enclosing cover differs from the one under the group, so it adds information.
        tail = f"surrounded by {p.area(surrounding, 'the')}"
    if p.chance(0.5):
        return f"there {p.be(n)} {p.group(group)} {tail}"
    verb = pick(rng, _VERBS.get(group.label, ("located",)))
    return f"{p.group(group)} {p.be(n)} {verb} {tail}"


def _sentence_pair(p: _Phraser, a: ObjectGroup, b: ObjectGroup) -> str | None:
    relations = spatial_relations(a, b)
    if not relations:
        return None
    relation = pick(p.rng, relations)
    phrase = {"left of": "to the left of", "right of": "to the right of"}.get(relation, relation)
    if relation == "next to" and p.chance(0.3):
        phrase = "beside"
    if p.chance(0.35):
        return f"there {p.be(a.count)} {p.group(a)} {phrase} {p.group(b)}"
    return f"{p.group(a)} {p.be(a.count)} {phrase} {p.group(b)}"


def _sentence_overview(p: _Phraser, groups: Sequence[ObjectGroup]) -> str:
    listed = list(groups) if p.detail() else list(groups[:1])
    phrases = [p.group(g) for g in listed]
    objects = phrases[0] if len(phrases) == 1 else ", ".join(phrases[:-1]) + " and " + phrases[-1]
    overview = p.scene_overview()
    # Avoid "a lawn with the sea on the left with two cars".
    return f"{objects} in {overview}" if " with " in overview else f"{overview} with {objects}"


def _sentence_layout(p: _Phraser, groups: Sequence[ObjectGroup]) -> str:
    spec, rng = p.spec, p.rng
    primary, secondary = spec.land_cover, spec.secondary_cover
    if secondary is None:
        sentence = pick(rng, (f"the whole area is covered by {p.area(primary)}", f"this is {p.area(primary)}"))
    elif spec.layout in RIVER_LAYOUTS:
        sentence = f"a river flows {pick(rng, _RIVER_DIRECTIONS[spec.layout])} through {p.area(primary, 'the')}"
    elif spec.layout == "centre":
        inner = "a lake" if secondary == "water" else f"a patch of {pick(rng, _COVER_AREAS[secondary])}"
        sentence = f"{inner} is surrounded by {p.area(primary, 'the')}"
    else:
        side, opposite = _SIDES[spec.layout]
        sentence = pick(
            rng,
            (
                f"{p.area(secondary, 'the')} is on the {side} and {p.area(primary, 'the')} is on the {opposite}",
                f"the {side} part is {p.area(secondary)} and the {opposite} part is {p.area(primary)}",
            ),
        )
    if groups and p.detail():
        group = groups[int(rng.integers(len(groups)))]
        sentence += f", with {p.group(group)} {p.location(group)}"
    return sentence


def _finish(sentence: str) -> str:
    sentence = re.sub(r"\ba (?=[aeiou])", "an ", sentence)
    sentence = re.sub(r"\s+", " ", sentence).strip()
    return sentence[0].upper() + sentence[1:] + "."


def generate_captions(spec: SceneSpec, rng: np.random.Generator, count: int = 5, specificity: float = 0.7) -> list[str]:
    """Describe a scene with ``count`` different captions.

    Args:
        spec: the scene.
        rng: random source for every wording choice.
        count: number of captions.
        specificity: 0..1, how much detail captions carry (see the module doc).

    Returns:
        ``count`` captions; distinct whenever the grammar allows.

    Raises:
        ValueError: ``specificity`` is outside [0, 1] or ``count`` is below 1.
    """
    if not 0.0 <= specificity <= 1.0:
        raise InputError(f"caption specificity must be in [0, 1], got {specificity}")
    if count < 1:
        raise InputError(f"caption count must be at least 1, got {count}")
    phraser = _Phraser(spec, rng, specificity)
    groups = list(spec.salient_groups)
    captions: list[str] = []
    for _ in range(count):
        caption = ""
        for _attempt in range(12):
            caption = _finish(_draw_sentence(phraser, groups))
            if caption not in captions:
                break
        captions.append(caption)
    return captions


def _draw_sentence(p: _Phraser, groups: list[ObjectGroup]) -> str:
    rng = p.rng
    if not groups:
        return _sentence_layout(p, groups)
    kinds = ["overview", "layout"] + ["group"] * len(groups) + (["pair"] * 2 if len(groups) >= 2 else [])
    kind = pick(rng, kinds)
    if kind == "overview":
        return _sentence_overview(p, [groups[i] for i in rng.permutation(len(groups))])
    if kind == "layout":
        return _sentence_layout(p, groups)
    if kind == "pair":
        a, b = (groups[i] for i in rng.choice(len(groups), size=2, replace=False))
        # Groups with no clear relation get a sentence about the first alone.
        return _sentence_pair(p, a, b) or _sentence_group(p, a)
    return _sentence_group(p, groups[int(rng.integers(len(groups)))])


def build_vocabulary(
    captions: Iterable[str], min_count: int = 1, stopwords: frozenset[str] = VOCAB_STOPWORDS
) -> Vocabulary:
    """Vocabulary from captions, the way the original ``vocab.py`` builds it.

    Words keep their order of first appearance; stopwords and words seen fewer than ``min_count``
    times are left out (they encode as ``<unk>``); ``<unk>`` is the last id.

    Args:
        captions: training captions.
        min_count: minimum number of occurrences for a word to get an id.
        stopwords: words never given an id.

    Returns:
        The vocabulary.

    Raises:
        ValueError: ``min_count`` is below 1.
    """
    if min_count < 1:
        raise InputError(f"min_count must be at least 1, got {min_count}")
    counts: Counter[str] = Counter()
    for caption in captions:
        counts.update(tokenize(caption))
    # Counter keeps insertion order, i.e. first appearance.
    return Vocabulary.from_words([w for w, c in counts.items() if c >= min_count and w not in stopwords])
