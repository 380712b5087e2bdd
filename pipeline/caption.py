"""The caption stage: a short description of every text entity and visual object (DESIGN.md §2).

Three backends (``caption.backend``):

- ``mllm``: a multimodal LLM (any transformers image-text-to-text model with a chat template; the
  paper used Qwen2.5-VL-7B-Instruct) answers one prompt per item from ``pipeline/prompts/*.json``,
  greedily, in left-padded batches. Rows are appended to ``captions.jsonl`` as they are made, so a
  killed run resumes where it stopped. ``--shard i --num-shards n`` splits the work: each worker
  appends to ``shards/part-i-of-n.jsonl``; the worker that finds every item done (or a later run
  without shards) merges all rows into the output.
- ``file``: imports a caption file in the UMRE format (image -> {entity name or "[OBJk]": text}).
- ``none``: no captions (the paper's "without caption" ablation); writes an empty table.

The output folder is read by :class:`pipeline.caption_table.CaptionTable`.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import math
import os
import shutil
import string
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from PIL import Image

from pipeline.caption_table import (
    CAPTIONS_JSON,
    CAPTIONS_JSONL,
    MANIFEST_JSON,
    CaptionItem,
    caption_items,
    coverage_of,
    read_caption_mapping,
)
from pipeline.config import CaptionParams
from pipeline.data.records import DataError, Dataset, atomic_write_text, read_json, write_json
from pipeline.hub import resolve

if TYPE_CHECKING:
    import torch

__all__ = [
    "PromptSet",
    "load_prompts",
    "build_prompt",
    "crop_box",
    "Captioner",
    "build_tiny_captioner",
    "settings_id",
    "read_row_log",
    "append_rows",
    "shard_items",
    "generate_captions",
    "ImportedCaptions",
    "import_caption_file",
    "run_caption",
]

log = logging.getLogger(__name__)

SHARDS_DIR = "shards"
UNKNOWN_REPORT_LIMIT = 100  # entries listed in the manifest; the count is always exact
MAX_CROP_ASPECT = 100  # image processors refuse extreme aspect ratios (Qwen: 200)


# ---------------------------------------------------------------------------------------------
# Prompts


@dataclass(frozen=True)
class PromptTemplate:
    prompt: str
    image: str  # "full": the post's image; "crop": the object's box cut from it


@dataclass(frozen=True)
class PromptSet:
    """A versioned set of prompt templates (``pipeline/prompts/caption_v1.json``)."""

    version: str
    sha256: str  # of the parsed content, so any edit is noticed even without a version bump
    system: str
    entity: PromptTemplate
    object: PromptTemplate


_FIELDS = {"entity": {"text", "name"}, "object": {"text"}}


def load_prompts(path: str | Path) -> PromptSet:
    """Load and check a prompt template file; errors name the file and the field."""
    path = Path(path)
    raw = read_json(path, "prompt template file (param caption.prompts)")
    if not isinstance(raw, dict) or not isinstance(raw.get("version"), str) or not raw["version"]:
        raise DataError(f'{path}: expected an object with a non-empty string "version"')
    templates = {}
    for kind, allowed in _FIELDS.items():
        entry = raw.get(kind)
        if not isinstance(entry, dict) or not isinstance(entry.get("prompt"), str):
            raise DataError(f'{path}: "{kind}": expected {{"prompt": str, "image": ...}}')
        if entry.get("image") not in ("full", "crop"):
            raise DataError(
                f'{path}: "{kind}.image": expected "full" or "crop", found {entry.get("image")!r}'
            )
        try:
            used = {f for _, f, _, _ in string.Formatter().parse(entry["prompt"]) if f is not None}
        except ValueError as exc:
            raise DataError(f'{path}: "{kind}.prompt": bad template ({exc})') from exc
        if not used <= allowed:
            raise DataError(
                f'{path}: "{kind}.prompt": unknown placeholder(s) {sorted(used - allowed)}; '
                f"allowed: {sorted(allowed)} (write literal braces as {{{{ }}}})"
            )
        templates[kind] = PromptTemplate(entry["prompt"], entry["image"])
    system = raw.get("system", "")
    if not isinstance(system, str):
        raise DataError(f'{path}: "system": expected a string, found {type(system).__name__}')
    digest = hashlib.sha256(json.dumps(raw, sort_keys=True).encode()).hexdigest()
    return PromptSet(raw["version"], digest, system, templates["entity"], templates["object"])


def build_prompt(item: CaptionItem, prompts: PromptSet) -> str:
    """The question asked about one item: the entity or object template filled with the post."""
    if item.kind == "entity":
        return prompts.entity.prompt.format(text=item.text, name=item.key)
    return prompts.object.prompt.format(text=item.text)


def crop_box(image: Image.Image, box: Sequence[float]) -> Image.Image:
    """Cut a box given in [0, 1] coordinates; degenerate boxes are widened to at least 1 pixel and
    an aspect ratio of at most 100, since image processors reject thinner images."""
    width, height = image.size
    x1, y1, x2, y2 = box
    left, right = math.floor(x1 * width), math.ceil(x2 * width)
    top, bottom = math.floor(y1 * height), math.ceil(y2 * height)
    left, top = min(max(left, 0), width - 1), min(max(top, 0), height - 1)
    right, bottom = min(max(right, left + 1), width), min(max(bottom, top + 1), height)

    def widen(lo: int, hi: int, need: int, size: int) -> tuple[int, int]:
        grow = max(0, need - (hi - lo))
        lo = max(0, lo - grow // 2)
        return max(0, min(lo, size - need)), min(size, max(lo, 0) + need)

    w, h = right - left, bottom - top
    if w * MAX_CROP_ASPECT < h:
        left, right = widen(left, right, min(width, math.ceil(h / MAX_CROP_ASPECT)), width)
    elif h * MAX_CROP_ASPECT < w:
        top, bottom = widen(top, bottom, min(height, math.ceil(w / MAX_CROP_ASPECT)), height)
    return image.crop((left, top, right, bottom))


# ---------------------------------------------------------------------------------------------
# The model


_TINY_SPECIALS = (
    "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>", "<|image_pad|>",
    "<|video_pad|>",
)  # fmt: skip

# A small chat template in the Qwen style (messages of text and image parts), for the tiny model.
_TINY_CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n"
    "{% if m['content'] is string %}{{ m['content'] }}{% else %}{% for c in m['content'] %}"
    "{% if c['type'] == 'image' %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif c['type'] == 'text' %}{{ c['text'] }}{% endif %}{% endfor %}{% endif %}"
    "<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def build_tiny_captioner() -> tuple[Any, Any]:
    """A tiny Qwen2.5-VL (random weights, seeded) with a byte-level tokenizer and an image
    processor, built offline; returns ``(processor, model)``, the same on every machine."""
    import torch
    from tokenizers import pre_tokenizers
    from transformers import (
        Qwen2_5_VLConfig,
        Qwen2_5_VLForConditionalGeneration,
        Qwen2_5_VLProcessor,
        Qwen2Tokenizer,
        Qwen2VLImageProcessor,
        Qwen2VLVideoProcessor,
    )

    vocab = {"<|endoftext|>": 0}
    for symbol in sorted(pre_tokenizers.ByteLevel.alphabet()):
        vocab[symbol] = len(vocab)
    merges = [("Ġ", "t"), ("h", "e"), ("Ġt", "he"), ("i", "n"), ("Ġ", "a"), ("e", "r")]
    for left, right in merges:
        vocab[left + right] = len(vocab)
    tokenizer = Qwen2Tokenizer(
        vocab=vocab, merges=merges, additional_special_tokens=list(_TINY_SPECIALS)
    )
    ids = {token: tokenizer.convert_tokens_to_ids(token) for token in _TINY_SPECIALS}
    processor = Qwen2_5_VLProcessor(
        image_processor=Qwen2VLImageProcessor(min_pixels=28 * 28 * 4, max_pixels=56 * 56),
        tokenizer=tokenizer,
        video_processor=Qwen2VLVideoProcessor(),
        chat_template=_TINY_CHAT_TEMPLATE,
    )
    config = Qwen2_5_VLConfig(
        text_config={
            "vocab_size": len(tokenizer),
            "hidden_size": 64,
            "intermediate_size": 128,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
            "num_key_value_heads": 2,
            "max_position_embeddings": 4096,
            "rope_parameters": {
                "rope_type": "default",
                "rope_theta": 1e4,
                "mrope_section": [2, 2, 4],
            },
            "bos_token_id": None,
            "eos_token_id": ids["<|im_end|>"],
            "pad_token_id": tokenizer.pad_token_id,
            # Larger than the usual 0.02, so answers depend clearly on the prompt and image.
            "initializer_range": 0.2,
        },
        vision_config={
            "depth": 2,
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_heads": 2,
            "out_hidden_size": 64,
            "window_size": 56,
            "fullatt_block_indexes": [1],
            "initializer_range": 0.2,
        },
        image_token_id=ids["<|image_pad|>"],
        video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"],
        vision_end_token_id=ids["<|vision_end|>"],
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = Qwen2_5_VLForConditionalGeneration(config)
    model.generation_config.eos_token_id = ids["<|im_end|>"]
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    # Random weights emit random bytes; keep answers to lowercase words so they read as text.
    readable = {tokenizer.convert_tokens_to_ids(c) for c in "Ġ" + string.ascii_lowercase}
    readable |= {vocab[a + b] for a, b in merges} | {ids["<|im_end|>"]}
    model.generation_config.suppress_tokens = sorted(set(range(len(tokenizer))) - readable)
    return processor, model.eval()


def _torch_dtype(name: str) -> torch.dtype:
    import torch

    return {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}[name]


class Captioner:
    """An image-text-to-text model and its processor, answering prompts greedily in batches."""

    def __init__(
        self,
        processor: Any,
        model: Any,
        name: str,
        *,
        dtype: str = "float32",
        max_new_tokens: int = 24,
        device: str | None = None,
    ):
        import torch

        if getattr(processor, "chat_template", None) is None:
            raise ValueError(
                f"captioner {name!r}: its processor has no chat template; caption.backend mllm "
                "needs an instruction-tuned model that has one"
            )
        self.name = name
        self.processor = processor
        self.tokenizer = processor.tokenizer
        # Left padding keeps every prompt's last token next to the first generated one.
        self.tokenizer.padding_side = "left"
        if device is None and torch.cuda.is_available():
            # One GPU per worker under a launcher (accelerate, torchrun): the worker's LOCAL_RANK.
            device = f"cuda:{os.environ.get('LOCAL_RANK', '0')}"
        self.device = torch.device(device or "cpu")
        # Reduced precision only where autocast serves it (GPU); on CPU always float32.
        self.dtype = dtype if self.device.type == "cuda" else "float32"
        self.max_new_tokens = max_new_tokens
        self.model = model.to(self.device, _torch_dtype(self.dtype)).eval()
        pad = self.tokenizer.pad_token_id
        eos = model.generation_config.eos_token_id
        if pad is None:
            pad = eos[0] if isinstance(eos, list) else eos
        self._generate_kwargs = {
            "max_new_tokens": max_new_tokens,
            "do_sample": False,
            "num_beams": 1,
            "pad_token_id": pad,
            "eos_token_id": eos,
        }

    @classmethod
    def load(cls, name: str, *, dtype: str = "float32", max_new_tokens: int = 24) -> Captioner:
        """Load by name: "tiny" (offline, random), a local folder, or a hub id."""
        source = resolve(name)
        if source.kind == "tiny":
            processor, model = build_tiny_captioner()
            return cls(processor, model, name, dtype=dtype, max_new_tokens=max_new_tokens)
        import torch
        from transformers import AutoModelForImageTextToText, AutoProcessor

        where = str(source.path or source.name)
        load_dtype = _torch_dtype(dtype) if torch.cuda.is_available() else torch.float32
        try:
            processor = AutoProcessor.from_pretrained(where)
            model = AutoModelForImageTextToText.from_pretrained(where, dtype=load_dtype)
        except OSError as exc:
            raise OSError(
                f"could not load captioner {name!r} ({exc}); offline, set caption.model to a "
                "local folder or 'tiny'"
            ) from exc
        return cls(processor, model, name, dtype=dtype, max_new_tokens=max_new_tokens)

    def _autocast(self) -> contextlib.AbstractContextManager:
        import torch

        if self.device.type == "cuda" and self.dtype != "float32":
            return torch.autocast("cuda", dtype=_torch_dtype(self.dtype))
        return contextlib.nullcontext()

    def describe(
        self, prompts: Sequence[str], images: Sequence[Image.Image], system: str = ""
    ) -> list[str]:
        """Answer each prompt about its image, as one left-padded batch; whitespace collapsed."""
        import torch

        texts = []
        for prompt in prompts:
            messages = []
            if system:
                messages.append({"role": "system", "content": [{"type": "text", "text": system}]})
            content = [{"type": "image"}, {"type": "text", "text": prompt}]
            messages.append({"role": "user", "content": content})
            texts.append(
                self.processor.apply_chat_template(
                    messages, add_generation_prompt=True, tokenize=False
                )
            )
        batch = self.processor(text=texts, images=list(images), return_tensors="pt", padding=True)
        float_dtype = _torch_dtype(self.dtype)
        batch = {
            k: v.to(self.device, float_dtype if v.is_floating_point() else v.dtype)
            for k, v in batch.items()
            if isinstance(v, torch.Tensor)
        }
        with torch.inference_mode(), self._autocast():
            out = self.model.generate(**batch, **self._generate_kwargs)
        answers = self.tokenizer.batch_decode(
            out[:, batch["input_ids"].shape[1] :], skip_special_tokens=True
        )
        return [" ".join(answer.split()) for answer in answers]


# ---------------------------------------------------------------------------------------------
# The row log: append-only JSONL, one whole line per row, safe against kills


def settings_id(model: str, prompts: PromptSet, max_new_tokens: int, dtype: str) -> str:
    """A short hash of everything that changes an answer; rows of other settings are not reused."""
    payload = json.dumps(
        [model, prompts.version, prompts.sha256, max_new_tokens, dtype], separators=(",", ":")
    )
    return hashlib.sha256(payload.encode()).hexdigest()[:16]


_ROW_KEYS = ("image_id", "key", "caption", "settings")


def read_row_log(path: Path, *, repair: bool = False) -> list[dict[str, Any]]:
    """Rows of a caption log. A trailing line without its newline (a write cut by a kill) is not
    trusted: ignored, and cut off the file when ``repair`` (the log's own writer is restarting)."""
    try:
        data = path.read_bytes()
    except FileNotFoundError:  # not started yet, or merged and removed by the last worker
        return []
    end = data.rfind(b"\n") + 1
    if end < len(data):
        log.warning("%s: ignoring a half-written last row (%d bytes)", path, len(data) - end)
        if repair:
            os.truncate(path, end)
    rows = []
    for lineno, line in enumerate(data[:end].split(b"\n")[:-1], 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            if not isinstance(row, dict) or any(k not in row for k in _ROW_KEYS):
                raise ValueError(f"expected an object with keys {', '.join(_ROW_KEYS)}")
        except ValueError as exc:
            raise DataError(
                f"{path}:{lineno}: corrupt caption row ({exc}); delete this file to start over"
            ) from exc
        rows.append(row)
    return rows


def append_rows(path: Path, rows: Sequence[dict[str, Any]]) -> None:
    """Append whole lines and fsync, so after a crash the log holds complete rows only (plus at
    most one cut line, which :func:`read_row_log` drops)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("ab") as fh:
        fh.write(_row_lines(rows).encode("utf-8"))
        fh.flush()
        os.fsync(fh.fileno())


def _row_lines(rows: Sequence[dict[str, Any]]) -> str:
    return "".join(json.dumps(r, ensure_ascii=False, sort_keys=True) + "\n" for r in rows)


def shard_items(items: Sequence[CaptionItem], shard: int, num_shards: int) -> list[CaptionItem]:
    """Shard ``shard`` of ``num_shards``: a contiguous block of the sorted item list, so one
    image's items stay together; block sizes differ by at most one."""
    if num_shards < 1 or not 0 <= shard < num_shards:
        raise ValueError(f"--shard must be in [0, {num_shards}) and --num-shards >= 1")
    n = len(items)
    return list(items[shard * n // num_shards : (shard + 1) * n // num_shards])


def _log_path(out: Path, shard: int, num_shards: int) -> Path:
    if num_shards == 1:
        return out / CAPTIONS_JSONL
    return out / SHARDS_DIR / f"part-{shard:03d}-of-{num_shards:03d}.jsonl"


def _all_logs(out: Path) -> list[Path]:
    return [out / CAPTIONS_JSONL, *sorted((out / SHARDS_DIR).glob("part-*.jsonl"))]


def _rows_by_item(out: Path, settings: str) -> dict[tuple[str, str], dict[str, Any]]:
    """Rows of these settings in the main log and every shard log, by (image id, key)."""
    done: dict[tuple[str, str], dict[str, Any]] = {}
    for path in _all_logs(out):
        for row in read_row_log(path):
            if row["settings"] == settings:
                done.setdefault((row["image_id"], row["key"]), row)
    return done


# ---------------------------------------------------------------------------------------------
# Generation


def _batches(items: Sequence[CaptionItem], size: int) -> Iterator[list[CaptionItem]]:
    # Batches are cut from the full item list, not from what is left, so a resumed run forms the
    # same batches as an uninterrupted one wherever a batch was not half done.
    for start in range(0, len(items), size):
        yield list(items[start : start + size])


def _item_image(
    item: CaptionItem, dataset: Dataset, prompts: PromptSet, cache: dict[str, Image.Image]
) -> Image.Image:
    """The image a prompt is about: the post's image, or the object's crop of it."""
    if item.image_id not in cache:
        path = dataset.image_path(item.image_id)
        try:
            with Image.open(path) as im:
                cache[item.image_id] = im.convert("RGB")
        except FileNotFoundError as exc:
            raise DataError(f"{path}: image {item.image_id!r} not found") from exc
    image = cache[item.image_id]
    template = prompts.entity if item.kind == "entity" else prompts.object
    if template.image == "crop" and item.box is not None:
        return crop_box(image, item.box)
    return image


def generate_captions(
    dataset: Dataset,
    out: Path,
    captioner: Captioner,
    prompts: PromptSet,
    *,
    batch_size: int = 8,
    shard: int = 0,
    num_shards: int = 1,
    progress: bool = True,
    after_batch: Callable[[int], None] | None = None,
) -> tuple[list[CaptionItem], dict[tuple[str, str], dict[str, Any]], int]:
    """Caption this shard's items that no log of the same settings has yet, appending rows to the
    shard's log. Returns (all items, rows by (image id, key) of these settings, rows made now).

    ``after_batch(rows_made_so_far)`` runs after each batch is on disk (tests stop runs with it).
    """
    from tqdm.auto import tqdm

    items = caption_items(dataset)
    mine = shard_items(items, shard, num_shards)
    settings = settings_id(captioner.name, prompts, captioner.max_new_tokens, captioner.dtype)
    target = _log_path(out, shard, num_shards)

    own_rows = read_row_log(target, repair=True)
    kept = [r for r in own_rows if r["settings"] == settings]
    if len(kept) < len(own_rows):
        made_by = sorted(
            {f"{r.get('model')} {r.get('prompt_version')}" for r in own_rows}
            - {f"{captioner.name} {prompts.version}"}
        )
        log.info(
            "%s: dropping %d row(s) made with other settings (model and prompt version: %s)",
            target, len(own_rows) - len(kept), ", ".join(made_by) or "same, other options",
        )  # fmt: skip
        atomic_write_text(target, _row_lines(kept))

    done = _rows_by_item(out, settings)

    pending = sum((it.image_id, it.key) not in done for it in mine)
    log.info(
        "caption: %d item(s) in shard %d/%d, %d already done, %d to generate with %s (%s)",
        len(mine), shard, num_shards, len(mine) - pending, pending, captioner.name, prompts.version,
    )  # fmt: skip
    made = 0
    bar = tqdm(total=pending, unit="item", desc="caption", disable=not progress or pending == 0)
    with bar:
        for batch in _batches(mine, batch_size):
            todo = [it for it in batch if (it.image_id, it.key) not in done]
            if not todo:
                continue
            cache: dict[str, Image.Image] = {}
            images = [_item_image(it, dataset, prompts, cache) for it in todo]
            answers = captioner.describe(
                [build_prompt(it, prompts) for it in todo], images, prompts.system
            )
            rows = [
                {
                    "image_id": it.image_id,
                    "key": it.key,
                    "kind": it.kind,
                    "caption": answer,
                    "model": captioner.name,
                    "prompt_version": prompts.version,
                    "settings": settings,
                }
                for it, answer in zip(todo, answers, strict=True)
            ]
            append_rows(target, rows)
            for row in rows:
                done[(row["image_id"], row["key"])] = row
            made += len(rows)
            bar.update(len(rows))
            if after_batch is not None:
                after_batch(made)
    return items, done, made


# ---------------------------------------------------------------------------------------------
# File import


@dataclass(frozen=True)
class Unknown:
    image_id: str
    key: str
    reason: str

    def __str__(self) -> str:
        return f"image {self.image_id!r} key {self.key!r}: {self.reason}"


@dataclass(frozen=True)
class ImportedCaptions:
    """A caption file matched against the dataset's items."""

    found: dict[tuple[str, str], str]  # (image id, key) -> caption, for items only
    unused: int  # captions of entities the post names but no record pairs (harmless, dropped)
    unknown: list[Unknown]  # entries that match nothing in the dataset (reported, dropped)


def import_caption_file(path: Path, items: Sequence[CaptionItem]) -> ImportedCaptions:
    """Match a UMRE-style caption file to ``items``. An entry is unknown when its image is used by
    no record, when an "[OBJk]" key is not in objects.json for the image, or when a name key is
    neither a head/tail entity nor a substring of the image's post text."""
    mapping = read_caption_mapping(path)
    wanted: dict[str, set[str]] = {}
    texts: dict[str, str] = {}
    for item in items:
        wanted.setdefault(item.image_id, set()).add(item.key)
        texts[item.image_id] = item.text
    found: dict[tuple[str, str], str] = {}
    unused, unknown = 0, []
    for image_id in sorted(mapping):
        for key in sorted(mapping[image_id]):
            if image_id not in wanted:
                unknown.append(Unknown(image_id, key, "no record of the dataset uses this image"))
            elif key in wanted[image_id]:
                found[(image_id, key)] = mapping[image_id][key]
            elif _is_object_key(key):
                unknown.append(Unknown(image_id, key, "objects.json has no such object for it"))
            elif key in texts[image_id]:
                unused += 1
            else:
                unknown.append(Unknown(image_id, key, "no such entity in the image's post text"))
    return ImportedCaptions(found, unused, unknown)


def _is_object_key(key: str) -> bool:
    return key.startswith("[OBJ") and key.endswith("]")


# ---------------------------------------------------------------------------------------------
# The stage


def _write_output(
    out: Path, items: Sequence[CaptionItem], rows: Sequence[dict[str, Any]], manifest: dict
) -> None:
    """Write the sorted log, the compiled mapping and the manifest (each atomically), then drop
    shard logs; the manifest goes last, so a folder with a manifest is complete."""
    rows = sorted(rows, key=lambda r: (r["image_id"], r["key"]))
    mapping: dict[str, dict[str, str]] = {}
    for row in rows:
        mapping.setdefault(row["image_id"], {})[row["key"]] = row["caption"]
    # Coverage counts real captions: empty ones filled in for missing items do not count.
    real: dict[str, dict[str, str]] = {}
    for row in rows:
        if not row.get("filled"):
            real.setdefault(row["image_id"], {})[row["key"]] = row["caption"]
    coverage = coverage_of(real, items)
    (out / MANIFEST_JSON).unlink(missing_ok=True)
    atomic_write_text(out / CAPTIONS_JSONL, _row_lines(rows))
    write_json(out / CAPTIONS_JSON, mapping)
    write_json(
        out / MANIFEST_JSON,
        {**manifest, "items": len(items), "captions": len(rows), "coverage": coverage.to_json()},
    )
    shutil.rmtree(out / SHARDS_DIR, ignore_errors=True)


def _base_manifest(backend: str) -> dict[str, Any]:
    return {
        "backend": backend,
        "model": None,
        "prompt_version": None,
        "prompt_sha256": None,
        "settings": None,
        "max_new_tokens": None,
        "dtype": None,
        "source_file": None,
        "filled": 0,
        "unused": 0,
        "unknown": {"count": 0, "entries": []},
    }


def run_caption(
    dataset: Dataset,
    out: str | Path,
    params: CaptionParams,
    *,
    shard: int = 0,
    num_shards: int = 1,
    progress: bool = True,
    captioner: Captioner | None = None,
    after_batch: Callable[[int], None] | None = None,
) -> dict[str, Any]:
    """Run the caption stage into ``out``; returns the manifest (a summary for a shard run)."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    if params.backend == "mllm":
        return _run_mllm(dataset, out, params, shard, num_shards, progress, captioner, after_batch)
    if num_shards != 1:
        raise ValueError(f"--num-shards applies to caption.backend mllm only, not {params.backend}")
    items = caption_items(dataset)
    if params.backend == "none":
        manifest = _base_manifest("none")
        _write_output(out, items, [], manifest)
        return json.loads((out / MANIFEST_JSON).read_text())
    return _run_file(dataset, out, params, items)


def _run_mllm(
    dataset: Dataset,
    out: Path,
    params: CaptionParams,
    shard: int,
    num_shards: int,
    progress: bool,
    captioner: Captioner | None,
    after_batch: Callable[[int], None] | None,
) -> dict[str, Any]:
    if params.batch_size < 1 or params.max_new_tokens < 1:
        raise ValueError("caption.batch_size and caption.max_new_tokens must be at least 1")
    prompts = load_prompts(params.prompts)
    if captioner is None:
        captioner = Captioner.load(
            params.model, dtype=params.dtype, max_new_tokens=params.max_new_tokens
        )
    items, done, made = generate_captions(
        dataset, out, captioner, prompts,
        batch_size=params.batch_size, shard=shard, num_shards=num_shards,
        progress=progress, after_batch=after_batch,
    )  # fmt: skip
    settings = settings_id(captioner.name, prompts, captioner.max_new_tokens, captioner.dtype)
    if num_shards > 1:
        done = _rows_by_item(out, settings)  # other workers may have finished meanwhile
    missing = sum((it.image_id, it.key) not in done for it in items)
    if missing and num_shards == 1:
        raise RuntimeError(f"{missing} item(s) have no caption after generation")
    if missing:
        log.info(
            "caption: shard %d/%d done; %d item(s) of other shards still missing (the last "
            "worker to finish, or a run without --num-shards, writes the output)",
            shard, num_shards, missing,
        )  # fmt: skip
        mine = shard_items(items, shard, num_shards)
        return {
            "shard": shard,
            "num_shards": num_shards,
            "items": len(mine),
            "generated": made,
            "missing": missing,
        }
    rows = [done[(it.image_id, it.key)] for it in items]
    manifest = _base_manifest("mllm") | {
        "model": captioner.name,
        "prompt_version": prompts.version,
        "prompt_sha256": prompts.sha256,
        "settings": settings,
        "max_new_tokens": captioner.max_new_tokens,
        "dtype": captioner.dtype,
    }
    _write_output(out, items, rows, manifest)
    log.info("caption: %d caption(s) written to %s (%d generated now)", len(rows), out, made)
    return json.loads((out / MANIFEST_JSON).read_text())


def _run_file(
    dataset: Dataset, out: Path, params: CaptionParams, items: list[CaptionItem]
) -> dict[str, Any]:
    path = Path(params.file) if params.file else dataset.captions_path
    if not path.is_file():
        hint = "set caption.file" if not params.file else "check caption.file"
        raise DataError(f"{path}: caption file not found ({hint}, or use backend mllm or none)")
    imported = import_caption_file(path, items)
    found, unknown = imported.found, imported.unknown
    for entry in unknown[:20]:
        log.warning("%s: caption for an unknown item, ignored: %s", path, entry)
    if len(unknown) > 20:
        log.warning("%s: %d more unknown item(s), see the manifest", path, len(unknown) - 20)
    missing = [it for it in items if (it.image_id, it.key) not in found]
    log.info(
        "%s: %d of %d item(s) have a caption; %d caption(s) of entities no record pairs dropped",
        path, len(items) - len(missing), len(items), imported.unused,
    )  # fmt: skip
    if missing and params.on_missing == "fail":
        listed = "; ".join(f"image {it.image_id!r} key {it.key!r}" for it in missing[:10])
        raise DataError(
            f"{path}: {len(missing)} of {len(items)} item(s) have no caption, e.g. {listed} "
            "(set caption.on_missing: fill to use empty captions for them)"
        )
    rows = []
    for item in items:
        caption = found.get((item.image_id, item.key))
        row = {"image_id": item.image_id, "key": item.key, "kind": item.kind}
        row |= {"caption": caption or "", "filled": caption is None}
        rows.append(row | {"model": None, "prompt_version": None, "settings": None})
    manifest = _base_manifest("file") | {
        "source_file": str(path),
        "filled": len(missing),
        "unused": imported.unused,
        "unknown": {
            "count": len(unknown),
            "entries": [
                {"image_id": u.image_id, "key": u.key, "reason": u.reason}
                for u in unknown[:UNKNOWN_REPORT_LIMIT]
            ],
        },
    }
    _write_output(out, items, rows, manifest)
    return json.loads((out / MANIFEST_JSON).read_text())
