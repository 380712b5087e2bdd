"""The multimodal LLM that writes captions: loaded by name, answering prompts in batches.

``tiny`` builds a small random Qwen2.5-VL offline; a local folder or hub id goes through
transformers' ``AutoModelForImageTextToText``. :func:`crop_box` turns an object's box into the
image the model is shown: the pixels the features stage crops for the model, widened only where an
image processor refuses an extreme aspect ratio.
"""

from __future__ import annotations

import math
import string
from collections.abc import Sequence
from typing import Any

import torch
from PIL import Image

from pipeline.data.images import box_to_pixels
from pipeline.device import autocast, effective_dtype, select_device, torch_dtype
from pipeline.hub import resolve

__all__ = ["MAX_CROP_ASPECT", "crop_box", "build_tiny_captioner", "Captioner"]

MAX_CROP_ASPECT = 100  # image processors refuse extreme aspect ratios (Qwen: 200)


def crop_box(image: Image.Image, box: Sequence[float]) -> Image.Image:
    """The pixels of a [0, 1] box that the features stage crops (:func:`box_to_pixels`), widened
    to an aspect ratio of at most :data:`MAX_CROP_ASPECT`, since image processors reject thinner
    images."""
    width, height = image.size
    left, top, right, bottom = box_to_pixels(box, width, height)

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


QWEN_SPECIALS = (
    "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>", "<|image_pad|>",
    "<|video_pad|>",
)  # fmt: skip


def qwen_special_ids(tokenizer: Any) -> dict[str, int]:
    """The ids ``tokenizer`` gives Qwen2.5-VL's chat and vision special tokens (``QWEN_SPECIALS``):
    the token ids a Qwen2.5-VL config built for that tokenizer must name."""
    return {token: tokenizer.convert_tokens_to_ids(token) for token in QWEN_SPECIALS}


# A small chat template in the Qwen style (messages of text and image parts), for the tiny model.
_TINY_CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n"
    "{% if m['content'] is string %}{{ m['content'] }}{% else %}{% for c in m['content'] %}"
    "{% if c['type'] == 'image' %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif c['type'] == 'text' %}{{ c['text'] }}{% endif %}{% endfor %}{% endif %}"
    "<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def place_captioner(model: Any, device: torch.device, dtype: torch.dtype) -> Any:
    """``model`` on ``device`` with its floating-point parameters in ``dtype``; floating-point
    buffers keep their precision, as ``from_pretrained(dtype=...)`` leaves them: the rotary
    inverse frequencies stay float32 (``model.to(dtype)`` would round them to bfloat16, a phase
    error of tenths of a radian a few hundred positions in)."""
    model = model.to(device)
    with torch.no_grad():
        for parameter in model.parameters():
            if parameter.is_floating_point() and parameter.dtype != dtype:
                parameter.data = parameter.data.to(dtype)
    return model


def build_tiny_captioner() -> tuple[Any, Any]:
    """A tiny Qwen2.5-VL (random weights, seeded) with a byte-level tokenizer and an image
    processor, built offline; returns ``(processor, model)``, the same on every machine."""
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
        vocab=vocab, merges=merges, additional_special_tokens=list(QWEN_SPECIALS)
    )
    ids = qwen_special_ids(tokenizer)
    processor = Qwen2_5_VLProcessor(
        # A size of its own: transformers 5.17 writes min_pixels/max_pixels into the class's
        # default size, which every later Qwen2VLImageProcessor() of the process would get.
        image_processor=Qwen2VLImageProcessor(
            size={"shortest_edge": 28 * 28 * 4, "longest_edge": 56 * 56}
        ),
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


class Captioner:
    """An image-text-to-text model and its processor, answering prompts greedily in batches."""

    def __init__(
        self,
        processor: Any,
        model: Any,
        name: str,
        *,
        dtype: str,
        max_new_tokens: int,
        device: str | None = None,
    ):
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
        # One GPU per worker under a launcher (accelerate, torchrun): the worker's LOCAL_RANK.
        self.device = torch.device(device) if device is not None else select_device()
        self.dtype = effective_dtype(dtype, self.device)
        self.max_new_tokens = max_new_tokens
        self.model = place_captioner(model, self.device, torch_dtype(self.dtype)).eval()
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
    def load(cls, name: str, *, dtype: str, max_new_tokens: int) -> Captioner:
        """Load by name: "tiny" (offline, random), a local folder, or a hub id."""
        source = resolve(name)
        if source.kind == "tiny":
            processor, model = build_tiny_captioner()
            return cls(processor, model, name, dtype=dtype, max_new_tokens=max_new_tokens)
        from transformers import AutoModelForImageTextToText, AutoProcessor

        where = str(source.path or source.name)
        device = select_device()
        load_dtype = torch_dtype(effective_dtype(dtype, device))
        try:
            processor = AutoProcessor.from_pretrained(where)
            # Straight onto the device: a 7B model's 16 GB never pass through host memory.
            model = AutoModelForImageTextToText.from_pretrained(
                where, dtype=load_dtype, device_map=str(device)
            )
        except OSError as exc:
            raise OSError(
                f"could not load captioner {name!r} ({exc}); offline, set caption.model to a "
                "local folder or 'tiny'"
            ) from exc
        return cls(processor, model, name, dtype=dtype, max_new_tokens=max_new_tokens)

    def describe(
        self, prompts: Sequence[str], images: Sequence[Image.Image], system: str = ""
    ) -> list[str]:
        """Answer each prompt about its image, as one left-padded batch; whitespace collapsed."""
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
        float_dtype = torch_dtype(self.dtype)
        batch = {
            k: v.to(self.device, float_dtype if v.is_floating_point() else v.dtype)
            for k, v in batch.items()
            if isinstance(v, torch.Tensor)
        }
        with torch.inference_mode(), autocast(self.device, self.dtype):
            out = self.model.generate(**batch, **self._generate_kwargs)
        answers = self.tokenizer.batch_decode(
            out[:, batch["input_ids"].shape[1] :], skip_special_tokens=True
        )
        return [" ".join(answer.split()) for answer in answers]
