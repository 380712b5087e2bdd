"""The embedded default dataset: drawn scenes, short posts, and relations of all three pair kinds.

Every label is a deterministic function of what the inputs show, so a small model trained from
scratch can learn it:

- text-text: the post's relation clause links two of its entities (``PER joined ORG`` ->
  ``/per/org/member_of``); a neutral clause, or a pair the clause does not link, is ``none``.
- text-object: a cue about the person picks a family (``PER is pictured here`` ->
  ``/per/per/self``); the pair (PER, [OBJk]) has that label only if the object's shape fits the
  family (circle = person, square = building, triangle = flag), else ``none``.
- object-object: a square whose box holds the other object's centre -> ``/loc/loc/contain``; a
  triangle with a square -> ``/misc/loc/held_on``; two circles -> ``/per/per/opponent`` when the
  head is nearer than the tail (only the depth map tells when they do not overlap), else ``none``.

Boxes are whole pixels. Objects are drawn far to near; the pixel
``((x1 + x2) // 2, (y1 + y2) // 2)`` of each box shows its own object (a generator guarantee), so
each object's depth can be read back from the depth map. Same seed -> byte-identical files.

The shipped depth maps (``depth/<image>.npy``, float32 at image resolution) are on the scale of a
raw Depth-Anything-V2 output, which the features stage uses unnormalized by default
(``features.depth_scale: raw``, as the original): relative inverse depth, larger = nearer, not
scaled to [0, 1]. The background is 0 (farthest) and the objects sit on levels
``DEPTH_SCALE * (0.15, 0.20, ..., 1.0)``, i.e. 1.5 to 10.0.
"""

from __future__ import annotations

import dataclasses
import math
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from pipeline.config import SyntheticParams
from pipeline.data.records import (
    NONE_LABEL,
    PAIR_KINDS,
    SPLITS,
    UMRE_RELATIONS,
    Entity,
    Record,
    object_name,
    write_dataset,
)
from pipeline.io import staging_dir, write_json

__all__ = [
    "GENERATOR_VERSION",
    "DEPTH_SCALE",
    "VOCABULARY",
    "RELATIONS",
    "SHAPES",
    "COLOURS",
    "generate_synthetic",
    "object_pair_relation",
    "box_contains",
]

GENERATOR_VERSION = "2"  # 2: depth maps on a Depth-Anything-like scale (DEPTH_SCALE)
DEPTH_SCALE = 10.0  # shipped map value of an object at depth level 1.0 (the nearest)

SHAPES = ("circle", "square", "triangle")
SHAPE_NOUN = {"circle": "person", "square": "building", "triangle": "flag"}
COLOURS = {
    "red": (214, 39, 40),
    "green": (44, 160, 44),
    "blue": (31, 90, 200),
    "orange": (245, 127, 14),
    "purple": (148, 80, 189),
}

PERSONS = (
    "Anna Berg", "Omar Haddad", "Li Wei", "Maria Lopez", "John Smith", "Sara Nilsen",
    "Ken Ito", "Eva Novak", "Paul Dubois", "Nina Petrova", "Ravi Kumar", "Lea Martin",
)  # fmt: skip
ORGANISATIONS = (
    "Nordic Bank", "Acme", "Blue River Labs", "City Council", "Orion Media",
    "Delta Air", "Apex Football Club", "Unity Party",
)  # fmt: skip
PLACES = ("Oslo", "Paris", "New York", "Cape Town", "Lima", "Kyoto", "San Diego", "Lake Como")
NAMES = {"PER": PERSONS, "ORG": ORGANISATIONS, "LOC": PLACES}
ENTITY_CAPTION = {"PER": "a person", "ORG": "an organisation", "LOC": "a place"}

# Relation clauses per entity pair (head type, tail type); "none" = a neutral co-mention.
TEXT_CLAUSES: dict[tuple[str, str], dict[str, tuple[str, ...]]] = {
    ("PER", "ORG"): {
        "/per/org/member_of": ("PER joined ORG", "PER is a member of ORG", "PER signed with ORG"),
        "/per/org/leader_of": ("PER leads ORG", "PER is the head of ORG", "ORG named PER as chief"),
        NONE_LABEL: ("PER talked about ORG", "PER read a report on ORG"),
    },
    ("PER", "LOC"): {
        "/per/loc/place_of_birth": (
            "PER was born in LOC",
            "LOC is the birthplace of PER",
            "PER is a native of LOC",
        ),
        NONE_LABEL: ("PER wrote about LOC", "PER flew over LOC"),
    },
    ("ORG", "LOC"): {
        "/org/loc/locate_at": (
            "ORG is based in LOC",
            "ORG has its office in LOC",
            "the offices of ORG are in LOC",
        ),
        NONE_LABEL: ("ORG shared news from LOC", "ORG wrote about LOC"),
    },
}
# Cues about the person: the relation family a text-object pair can have ("none": no family).
PERSON_CUES: dict[str, tuple[str, ...]] = {
    "/per/per/self": ("PER is pictured here", "this photo shows PER", "PER smiles for the camera"),
    "/per/loc/place_of_residence": (
        "PER lives in this building",
        "this is the home of PER",
        "PER moved into this house",
    ),
    "/per/misc/present_in": (
        "PER attended this rally",
        "PER marched at this parade",
        "PER was at this protest",
    ),
    NONE_LABEL: ("PER shared this post", "PER liked this picture", "posted by PER"),
}
FAMILY_SHAPE = {
    "/per/per/self": "circle",
    "/per/loc/place_of_residence": "square",
    "/per/misc/present_in": "triangle",
}
_TEXT_RELATIONS = [
    (pair, lab) for pair, by in TEXT_CLAUSES.items() for lab in by if lab != NONE_LABEL
]
OPENERS = ("", "rt :", "news :", "photo :", "today :")
EXTRA_MENTIONS = {"ORG": ("via ORG", "source : ORG"), "LOC": ("location : LOC", "( LOC )")}

CONTAIN, HELD_ON, OPPONENT = "/loc/loc/contain", "/misc/loc/held_on", "/per/per/opponent"
_USED = (
    {label for clauses in TEXT_CLAUSES.values() for label in clauses}
    | set(PERSON_CUES)
    | {CONTAIN, HELD_ON, OPPONENT}
)
RELATIONS: tuple[str, ...] = tuple(label for label in UMRE_RELATIONS if label in _USED)


def _vocabulary() -> tuple[str, ...]:
    words = {"a", "an", "."} | set(COLOURS) | set(SHAPE_NOUN.values())
    phrases = [*PERSONS, *ORGANISATIONS, *PLACES, *OPENERS, *ENTITY_CAPTION.values()]
    phrases += [c for by_label in TEXT_CLAUSES.values() for cs in by_label.values() for c in cs]
    phrases += [c for cs in PERSON_CUES.values() for c in cs]
    phrases += [c for cs in EXTRA_MENTIONS.values() for c in cs]
    for phrase in phrases:
        words.update(w for w in phrase.split() if w not in NAMES)
    return tuple(sorted(words))


VOCABULARY: tuple[str, ...] = _vocabulary()


@dataclass(frozen=True)
class SceneObject:
    shape: str
    colour: str
    depth: float  # relative inverse depth: larger = nearer
    box_px: tuple[int, int, int, int]  # x1, y1, x2, y2 in pixels, end exclusive

    @property
    def centre_px(self) -> tuple[int, int]:
        x1, y1, x2, y2 = self.box_px
        return (x1 + x2) // 2, (y1 + y2) // 2


def box_contains(box: tuple[float, ...], inner: tuple[float, ...]) -> bool:
    """Whether the centre of box ``inner`` lies strictly inside ``box`` (both x1, y1, x2, y2)."""
    x1, y1, x2, y2 = box
    cx, cy = (inner[0] + inner[2]) / 2, (inner[1] + inner[3]) / 2
    return x1 < cx < x2 and y1 < cy < y2


def object_pair_relation(head: SceneObject, tail: SceneObject) -> str:
    """The object-object rule (the head's shape picks which rule applies)."""
    if head.shape == "square" and box_contains(head.box_px, tail.box_px):
        return CONTAIN
    if head.shape == "triangle" and tail.shape == "square":
        return HELD_ON
    if head.shape == "circle" and tail.shape == "circle" and head.depth > tail.depth:
        return OPPONENT
    return NONE_LABEL


@dataclass(frozen=True)
class Post:
    tokens: tuple[str, ...]
    # Entity type -> the mention [start, end) a pair marks: the one in the relation clause for
    # text-text pairs, else the first; the person's mention in the cue for text-object pairs.
    spans: dict[str, tuple[int, int]]
    cue_span: tuple[int, int]
    names: dict[str, str]  # entity type -> name
    clause_pair: tuple[str, str]
    clause_label: str
    cue: str  # person-cue family label or "none"


@dataclass(frozen=True)
class Candidate:
    kind: str
    head: Entity
    tail: Entity
    label: str
    subtype: str  # the label, or which way a pair is `none` (balanced when sampling)


def _pick(rng: np.random.Generator, seq: tuple | list) -> Any:
    return seq[int(rng.integers(len(seq)))]


def _make_post(rng: np.random.Generator) -> Post:
    names = {kind: _pick(rng, NAMES[kind]) for kind in NAMES}
    if rng.random() < 0.7:  # a relation clause, labels uniform
        pair, label = _pick(rng, _TEXT_RELATIONS)
    else:
        pair, label = _pick(rng, list(TEXT_CLAUSES)), NONE_LABEL
    clause = _pick(rng, TEXT_CLAUSES[pair][label])
    cue_family = _pick(rng, list(FAMILY_SHAPE)) if rng.random() < 0.8 else NONE_LABEL
    cue = _pick(rng, PERSON_CUES[cue_family])
    parts = [clause, cue] if rng.random() < 0.6 else [cue, clause]
    present = set(pair) | {"PER"}
    missing = [k for k in ("ORG", "LOC") if k not in present]
    tokens: list[str] = _pick(rng, OPENERS).split()
    segments = [(p + " .", "clause" if p == clause else "cue") for p in parts]
    if missing and rng.random() < 0.5:
        segments.append((_pick(rng, EXTRA_MENTIONS[missing[0]]), "extra"))
    mentions: dict[tuple[str, str], tuple[int, int]] = {}  # (segment role, type) -> span
    first: dict[str, tuple[int, int]] = {}
    for segment, role in segments:
        for word in segment.split():
            if word in NAMES:
                name_tokens = names[word].split()
                span = (len(tokens), len(tokens) + len(name_tokens))
                mentions[(role, word)] = span
                first.setdefault(word, span)
                tokens.extend(name_tokens)
            else:
                tokens.append(word)
    if not 10 <= len(tokens) <= 25:
        raise AssertionError(f"post length {len(tokens)} outside 10..25: {tokens}")
    spans = {k: mentions.get(("clause", k), span) for k, span in first.items()}
    used = {k: names[k] for k in spans}
    return Post(tuple(tokens), spans, mentions[("cue", "PER")], used, pair, label, cue_family)


def _make_objects(
    rng: np.random.Generator, size: int, n: int
) -> tuple[list[SceneObject], np.ndarray] | None:
    """Place ``n`` objects so each box-centre pixel shows its own object; None if it failed."""
    levels = np.round(0.15 + 0.05 * np.arange(18), 3)
    depths = rng.choice(levels, size=n, replace=False)
    wh = np.rint(rng.uniform(0.2, 0.45, size=(n, 2)) * size).astype(int)
    xy = (rng.random((n, 2)) * (size - wh + 1)).astype(int)
    shapes, colours = rng.integers(len(SHAPES), size=n), rng.integers(len(COLOURS), size=n)
    palette = tuple(COLOURS)
    x1s, y1s = xy.T.tolist()
    x2s, y2s = (xy + wh).T.tolist()
    boxes = list(zip(x1s, y1s, x2s, y2s, strict=True))
    objects = [
        SceneObject(SHAPES[shapes[i]], palette[colours[i]], float(depths[i]), boxes[i])
        for i in range(n)
    ]
    # Plant a containment now and then (random placement alone makes it rare).
    squares = [i for i, o in enumerate(objects) if o.shape == "square"]
    if squares and n > 1 and rng.random() < 0.4:
        s = _pick(rng, squares)
        t = _pick(rng, [i for i in range(n) if i != s])
        sq, other = objects[s], objects[t]
        sx1, sy1, sx2, sy2 = sq.box_px
        cx = int(rng.integers(sx1 + 1, sx2))
        cy = int(rng.integers(sy1 + 1, sy2))
        w, h = other.box_px[2] - other.box_px[0], other.box_px[3] - other.box_px[1]
        x1 = min(max(cx - w // 2, 0), size - w)
        y1 = min(max(cy - h // 2, 0), size - h)
        # The contained object stands in front of the building (its centre must stay visible).
        d_sq, d_other = min(sq.depth, other.depth), max(sq.depth, other.depth)
        objects[s] = SceneObject(sq.shape, sq.colour, d_sq, sq.box_px)
        objects[t] = SceneObject(other.shape, other.colour, d_other, (x1, y1, x1 + w, y1 + h))
    for obj in objects:
        px, py = obj.centre_px[0] + 0.5, obj.centre_px[1] + 0.5
        if not _covers(obj, px, py) or any(
            other.depth > obj.depth and _covers(other, px, py) for other in objects
        ):
            return None
    ys, xs = np.mgrid[0:size, 0:size] + 0.5
    ids = np.full((size, size), -1, dtype=np.int16)
    for i in sorted(range(n), key=lambda i: objects[i].depth):  # far to near
        ids[_covers(objects[i], xs, ys)] = i
    return objects, ids


def _covers(obj: SceneObject, x: Any, y: Any) -> Any:
    """Whether the points (x, y) (pixel units; scalars or arrays) lie on the drawn shape."""
    x1, y1, x2, y2 = obj.box_px
    inside = (x >= x1) & (x < x2) & (y >= y1) & (y < y2)
    cx, cy, half_w, half_h = (x1 + x2) / 2, (y1 + y2) / 2, (x2 - x1) / 2, (y2 - y1) / 2
    if obj.shape == "circle":
        return inside & (((x - cx) / half_w) ** 2 + ((y - cy) / half_h) ** 2 <= 1.0)
    if obj.shape == "triangle":  # apex at the top centre, base along the bottom edge
        return inside & (np.abs(x - cx) <= half_w * (y - y1) / (y2 - y1))
    return inside


def _render(
    rng: np.random.Generator, objects: list[SceneObject], ids: np.ndarray
) -> tuple[Image.Image, np.ndarray]:
    size = ids.shape[0]
    background = np.array([238, 236, 230], dtype=np.int16)
    rgb = background + rng.integers(-6, 7, size=(size, size, 3), dtype=np.int16)
    depth = np.zeros((size, size), dtype=np.float32)
    for i, obj in enumerate(objects):
        visible = ids == i
        rgb[visible] = COLOURS[obj.colour]
        depth[visible] = obj.depth * DEPTH_SCALE
    return Image.fromarray(rgb.clip(0, 255).astype(np.uint8), "RGB"), depth


def _object_count(rng: np.random.Generator, max_objects: int) -> int:
    counts = np.arange(2, min(max_objects, 18) + 1)
    weights = np.where((counts >= 3) & (counts <= 6), 3.0, np.where(counts == 2, 1.0, 0.5))
    return int(rng.choice(counts, p=weights / weights.sum()))


def _candidates(post: Post, objects: list[SceneObject], names: list[str]) -> list[Candidate]:
    text = {k: Entity("text", post.names[k], post.spans[k]) for k in post.spans}
    out: list[Candidate] = []
    for head, tail in (("PER", "ORG"), ("PER", "LOC"), ("ORG", "LOC")):
        if head in text and tail in text:
            linked = (head, tail) == post.clause_pair
            label = post.clause_label if linked else NONE_LABEL
            subtype = label if label != NONE_LABEL else ("neutral" if linked else "unlinked")
            out.append(Candidate("text-text", text[head], text[tail], label, subtype))
    person = Entity("text", post.names["PER"], post.cue_span)
    for name, obj in zip(names, objects, strict=True):
        fits = post.cue != NONE_LABEL and FAMILY_SHAPE[post.cue] == obj.shape
        label = post.cue if fits else NONE_LABEL
        subtype = label if fits else ("neutral" if post.cue == NONE_LABEL else "mismatch")
        out.append(Candidate("text-object", person, Entity("object", name), label, subtype))
    for i, head in enumerate(objects):
        for j, tail in enumerate(objects):
            if i != j:
                label = object_pair_relation(head, tail)
                subtype = label if label != NONE_LABEL else _object_none_subtype(head, tail)
                out.append(
                    Candidate(
                        "object-object",
                        Entity("object", names[i]),
                        Entity("object", names[j]),
                        label,
                        subtype,
                    )
                )
    return out


def _object_none_subtype(head: SceneObject, tail: SceneObject) -> str:
    """Which way an object pair is `none`: "depth" (two circles, head farther: only depth tells),
    "outside" (a square not holding the tail's centre: only geometry tells), or "other"."""
    if head.shape == tail.shape == "circle":
        return "depth"
    return "outside" if head.shape == "square" else "other"


# Target share of `none` per pair kind (about 27% overall). Object pairs get more, so that the
# image-only rules are seen failing as often as holding.
_NONE_SHARE = {"text-text": 0.2, "text-object": 0.25, "object-object": 0.35}
# Relative frequency of each way to be a sample: the `none`s that need the image (a shape that does
# not fit the cue, a circle pair seen from the far side, a square that holds nothing) come first.
_SUBTYPE_WEIGHT = {"mismatch": 3.0, "depth": 2.0, "outside": 2.0}
_NONE_SUBTYPES = ("neutral", "unlinked", "mismatch", "depth", "outside", "other")
_SUBTYPES = {
    "text-text": (*(label for _, label in _TEXT_RELATIONS), "neutral", "unlinked"),
    "text-object": (*FAMILY_SHAPE, "mismatch", "neutral"),
    "object-object": (CONTAIN, HELD_ON, OPPONENT, "depth", "outside", "other"),
}


def _usage(stats: Counter, kind: str, subtype: str) -> float:
    return stats[(kind, subtype)] / _SUBTYPE_WEIGHT.get(subtype, 1.0)


def _choose(
    rng: np.random.Generator,
    kinds: list[str],
    candidates: list[Candidate],
    stats: Counter,
    strict: bool,
) -> tuple[list[Candidate], Counter] | None:
    """Pick one candidate per slot kind, steering each kind toward the target `none` share and
    balanced labels; returns the picks and the updated counts, or None when the scene cannot
    fill the slots (strict: with the wanted polarity)."""
    stats = stats.copy()
    chosen: list[Candidate] = []
    for kind in kinds:
        pool = [c for c in candidates if c.kind == kind and c not in chosen]
        n_kind, n_none = stats[(kind, "count")], stats[(kind, "none")]
        want_none = n_none < math.floor(_NONE_SHARE[kind] * (n_kind + 1) + 0.5)
        preferred = [c for c in pool if (c.label == NONE_LABEL) == want_none]
        if preferred:
            pool = preferred
        elif strict or not pool:
            return None
        usage = {c.subtype: _usage(stats, kind, c.subtype) for c in pool}
        if strict:  # keep labels balanced: no subtype may run ahead of the least used one
            polarity = [st for st in _SUBTYPES[kind] if (st in _NONE_SUBTYPES) == want_none]
            floor = min(_usage(stats, kind, st) for st in polarity)
            pool = [c for c in pool if usage[c.subtype] <= floor + 2]
            if not pool:
                return None
        least = min(usage[c.subtype] for c in pool)
        pool = [c for c in pool if usage[c.subtype] == least]
        pick = _pick(rng, pool)
        chosen.append(pick)
        stats[(kind, "count")] += 1
        stats[(kind, "none")] += pick.label == NONE_LABEL
        stats[(kind, pick.subtype)] += 1
    return chosen, stats


def _split_sizes(n_samples: int, images_per_split: int) -> list[int]:
    n_images = images_per_split if images_per_split > 0 else math.ceil(n_samples / 2)
    n_images = max(1, min(n_images, n_samples))
    per_image = [n_samples // n_images + (i < n_samples % n_images) for i in range(n_images)]
    if per_image[0] > 9:
        raise ValueError(
            f"synthetic: {n_samples} samples over {n_images} images is {per_image[0]} per image "
            "(expected at most 9): raise data.synthetic.images_per_split"
        )
    return per_image


def _make_image(
    rng: np.random.Generator, kinds: list[str], stats: Counter, size: int, max_objects: int
) -> tuple[Post, list[SceneObject], list[str], np.ndarray, list[Candidate], Counter]:
    """Draw scenes until one offers a sample for every slot kind (preferring the wanted polarity
    for the first tries); returns the scene, its samples and the updated counts."""
    for attempt in range(200):
        post = _make_post(rng)
        n = _object_count(rng, max_objects)
        placed = _make_objects(rng, size, n)
        while placed is None:
            n = max(2, n - (rng.random() < 0.2))  # crowded scenes: drop an object now and then
            placed = _make_objects(rng, size, n)
        objects, ids = placed
        names = [object_name(k) for k in rng.permutation(len(objects))]
        picked = _choose(rng, kinds, _candidates(post, objects, names), stats, attempt < 20)
        if picked is not None:
            return post, objects, names, ids, *picked
    raise RuntimeError(f"synthetic: no scene could fill the sample kinds {kinds}")


def generate_synthetic(out_dir: Path, params: SyntheticParams, max_objects: int = 12) -> dict:
    """Write the synthetic dataset (normalized layout) into ``out_dir``; return the manifest."""
    if max_objects < 2:
        raise ValueError(f"synthetic: max_objects must be at least 2, found {max_objects}")
    if params.image_size < 32:
        raise ValueError(f"synthetic: image_size must be at least 32, found {params.image_size}")
    sizes = {"train": params.train, "valid": params.valid, "test": params.test}
    for split, n in sizes.items():
        if n < 3:
            raise ValueError(f"synthetic: {split} needs at least 3 samples, found {n}")
    size = params.image_size
    splits: dict[str, list[Record]] = {}
    objects_json: dict[str, dict[str, list[float]]] = {}
    captions: dict[str, dict[str, str]] = {}
    with staging_dir(out_dir) as root:
        (root / "images").mkdir()
        (root / "depth").mkdir()
        for split_index, split in enumerate(SPLITS):
            # One stream per split: changing one split's size leaves the others unchanged.
            rng = np.random.default_rng([params.seed, split_index])
            records: list[Record] = []
            stats: Counter = Counter()
            per_image = _split_sizes(sizes[split], params.images_per_split)
            for image_index, n_samples in enumerate(per_image):
                kinds = [PAIR_KINDS[(len(records) + k) % 3] for k in range(n_samples)]
                post, objects, names, ids, chosen, stats = _make_image(
                    rng, kinds, stats, size, max_objects
                )
                stem = f"syn_{split}_{image_index:05d}"
                image, depth = _render(rng, objects, ids)
                image.save(root / "images" / f"{stem}.png", format="PNG", compress_level=6)
                np.save(root / "depth" / f"{stem}.npy", depth)
                named = dict(zip(names, objects, strict=True))
                objects_json[f"{stem}.png"] = {
                    name: [round(v / size, 6) for v in obj.box_px] for name, obj in named.items()
                }
                captions[f"{stem}.png"] = {
                    **{post.names[k]: ENTITY_CAPTION[k] for k in post.names},
                    **{
                        n: f"{'an' if o.colour[0] in 'aeiou' else 'a'} {o.colour} {SHAPE_NOUN[o.shape]}"
                        for n, o in named.items()
                    },
                }
                records += [
                    Record(
                        f"syn-{split}-{len(records) + k:05d}",
                        post.tokens,
                        f"{stem}.png",
                        c.head,
                        c.tail,
                        c.label,
                    )
                    for k, c in enumerate(chosen)
                ]
            splits[split] = records
        write_json(root / "captions.json", captions)
        manifest = write_dataset(
            root,
            splits,
            objects_json,
            RELATIONS,
            source="synthetic",
            version=GENERATOR_VERSION,
            extra={"params": {**dataclasses.asdict(params), "max_objects": max_objects}},
        )
    return manifest
