"""The paper's fidelity metric: do a concept's generations look like its object in the source image?

MCPL (Jin et al., ICML 2024) scores a learned word by the embedding similarity between the
objects it generates and the object it was learned from, both *masked* (the rest of the
image replaced), in the space of a pre-trained feature model (DINOv1 in their main table;
CLIP and DINOv2 too). This module computes it for users' own data, with a feature model the
user points to: a local transformers folder (never a download) of

    DINOv2        model_type "dinov2"               feature: pooler_output (the normed CLS token)
    DINO (v1)     model_type "vit" (ViTModel)       feature: the normed CLS token of last_hidden_state
    CLIP          model_type "clip" (CLIPModel)     feature: image_embeds (projected); also has text
    CLIP vision   model_type "clip_vision_model"    feature: image_embeds (CLIPVisionModelWithProjection)

Definition (per concept c and training image i that marks it; docs/FIDELITY.md):

- source object: the training image centre-cropped to a square (what training saw), masked by
  the ground-truth mask of c when the job has one, else by c's own attention map on that image
  (max-normalised, > the job's mask_threshold); pixels outside the mask set to the feature
  model's mean colour (zero after its normalisation), cropped to the mask's bounding box and
  padded to a square with the same colour;
- generated objects: c's samples ("a photo of a <c>"), each masked the same way by c's own
  attention in that generation (the sampling trajectory's mean map, > mask_threshold);
- `fidelity_<model_type>` = mean over generations of cos(f(generated object), f(source object)),
  f the feature model's pooled, L2-normalised embedding (inputs resized to its crop size and
  normalised with its mean/std from preprocessor_config.json);
- `clip_t` (CLIP folders with a text tower only) = mean over generations of the cosine between the
  whole generation's CLIP image embedding and the CLIP text embedding of the sample prompt with
  the learned token replaced by the concept's own words (adjective + initializer: "a photo of a
  red dog"): do the generations show what the words name?

Identical objects score 1; the paper reports DINOv1 masked similarities of about 0.31 (MCPL-all)
to 0.53 (full MCPL) and 0.55 (Break-A-Scene, trained with masks).
"""

from __future__ import annotations

import json
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from mcpl.concepts.metrics import upsample_map
from mcpl.errors import ConfigError, ModelLoadError

PREPROCESSOR_FILE = "preprocessor_config.json"
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
CLIP_MEAN, CLIP_STD = (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)
KINDS = {"dinov2": "DINOv2", "vit": "DINO (ViT)", "clip": "CLIP", "clip_vision_model": "CLIP vision"}
TEXT_KEY = "clip_t"
KEY_PREFIX = "fidelity_"


# ---------------------------------------------------------------------------- feature models
@dataclass
class FeatureModel:
    """A frozen image (and, for CLIP, text) encoder loaded from a local transformers folder."""

    path: str
    kind: str  # the folder's model_type: dinov2, vit, clip, clip_vision_model
    model: torch.nn.Module
    size: int  # the side its inputs are resized to (the processor's crop size)
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    device: torch.device
    tokenizer: object | None = None  # CLIP folders with a text tower

    @property
    def key(self) -> str:
        """The metric's name: `fidelity_dinov2`, `fidelity_vit` (DINOv1), `fidelity_clip`."""
        return KEY_PREFIX + ("clip" if self.kind.startswith("clip") else self.kind)

    @property
    def has_text(self) -> bool:
        return self.tokenizer is not None

    @property
    def fill(self) -> tuple[int, int, int]:
        """The neutral colour of masked-out pixels: the model's mean, zero after its normalisation."""
        return tuple(int(round(m * 255)) for m in self.mean)  # type: ignore[return-value]

    def pixels(self, images: Sequence[Image.Image]) -> torch.Tensor:
        """Square images -> (N, 3, size, size): resized (bicubic), scaled to [0, 1], normalised."""
        arrays = [np.asarray(square(im.convert("RGB"), self.fill).resize((self.size, self.size),
                                                                         Image.Resampling.BICUBIC),
                             dtype=np.float32) / 255.0 for im in images]
        x = torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2)
        mean, std = torch.tensor(self.mean).view(1, 3, 1, 1), torch.tensor(self.std).view(1, 3, 1, 1)
        return ((x - mean) / std).to(self.device)

    @torch.no_grad()
    def image_features(self, images: Sequence[Image.Image]) -> torch.Tensor:
        """(N, D) L2-normalised pooled embeddings."""
        x = self.pixels(images)
        if self.kind == "clip":
            out = self.model.visual_projection(self.model.vision_model(pixel_values=x).pooler_output)
        elif self.kind == "clip_vision_model":
            out = self.model(pixel_values=x).image_embeds
        elif self.kind == "dinov2":
            out = self.model(pixel_values=x).pooler_output
        else:  # vit (DINOv1): no pooler; the CLS token after the final layer norm
            out = self.model(pixel_values=x).last_hidden_state[:, 0]
        return F.normalize(out.float(), dim=-1).cpu()

    @torch.no_grad()
    def text_features(self, texts: Sequence[str]) -> torch.Tensor:
        if not self.has_text:
            raise ConfigError(f"{self.path} has no text tower (a CLIP folder with a tokenizer is needed for "
                              f"{TEXT_KEY})")
        tok = self.tokenizer(list(texts), padding="max_length", truncation=True, return_tensors="pt",
                             max_length=min(self.tokenizer.model_max_length,
                                            self.model.config.text_config.max_position_embeddings))
        pooled = self.model.text_model(input_ids=tok.input_ids.to(self.device),
                                       attention_mask=tok.attention_mask.to(self.device)).pooler_output
        return F.normalize(self.model.text_projection(pooled).float(), dim=-1).cpu()


def _preprocessing(folder: Path, kind: str) -> tuple[int, tuple, tuple]:
    """Input side, mean and std from the folder's preprocessor_config.json (else the family's defaults)."""
    clip = kind.startswith("clip")
    size, mean, std = 224, CLIP_MEAN if clip else IMAGENET_MEAN, CLIP_STD if clip else IMAGENET_STD
    file = folder / PREPROCESSOR_FILE
    if not file.is_file():
        return size, mean, std
    try:
        data = json.loads(file.read_text())
    except (OSError, ValueError) as err:
        raise ModelLoadError(f"cannot read {file}: {err}") from None
    crop = data.get("crop_size") if data.get("do_center_crop", True) else None
    crop = crop if crop is not None else data.get("size")
    if isinstance(crop, dict):
        crop = crop.get("height") or crop.get("shortest_edge") or crop.get("width")
    if isinstance(crop, int) and crop > 0:
        size = crop
    mean = tuple(data.get("image_mean") or mean)
    std = tuple(data.get("image_std") or std)
    if len(mean) != 3 or len(std) != 3:
        raise ModelLoadError(f"{file}: image_mean and image_std must have three values (RGB)")
    return size, mean, std  # type: ignore[return-value]


_CACHE: dict[tuple[str, str], FeatureModel] = {}
_LOCK = threading.Lock()


def load_feature_model(path: str | Path, device: str | torch.device | None = None) -> FeatureModel:
    """Load (once per process and device) a local DINOv2 / DINO / CLIP folder; never downloads."""
    from mcpl.method.models import pick_device

    folder = Path(path).expanduser()
    dev = pick_device(str(device) if device is not None else None)
    key = (str(folder.resolve()), str(dev))
    with _LOCK:
        if key in _CACHE:
            return _CACHE[key]
        if not (folder / "config.json").is_file():
            raise ModelLoadError(f"feature model {path!r} is not a local transformers folder (no config.json); "
                                 "give a folder saved with save_pretrained (DINOv2, DINO ViT or CLIP), e.g. a "
                                 "downloaded facebook/dinov2-small; nothing is downloaded")
        try:
            kind = json.loads((folder / "config.json").read_text()).get("model_type")
        except (OSError, ValueError) as err:
            raise ModelLoadError(f"cannot read {folder / 'config.json'}: {err}") from None
        if kind not in KINDS:
            raise ModelLoadError(f"feature model {path!r} is a {kind!r} model; use one of: "
                                 + ", ".join(f"{v} ({k})" for k, v in KINDS.items()))
        model, tokenizer = _load(folder, kind)
        size, mean, std = _preprocessing(folder, kind)
        loaded = FeatureModel(str(folder), kind, model.to(dev).eval().requires_grad_(False), size, mean, std, dev,
                              tokenizer)
        _CACHE[key] = loaded
        return loaded


def _load(folder: Path, kind: str):
    import transformers

    names = {"dinov2": "Dinov2Model", "vit": "ViTModel", "clip": "CLIPModel",
             "clip_vision_model": "CLIPVisionModelWithProjection"}
    cls = getattr(transformers, names[kind])
    extra = {"add_pooling_layer": False} if kind == "vit" else {}
    try:
        model = cls.from_pretrained(folder, local_files_only=True, **extra)
    except (OSError, ValueError) as err:
        raise ModelLoadError(f"cannot load feature model {folder} as {names[kind]}: {err}") from None
    tokenizer = None
    if kind == "clip" and any((folder / f).is_file() for f in ("tokenizer.json", "vocab.json")):
        try:
            tokenizer = transformers.AutoTokenizer.from_pretrained(folder, local_files_only=True)
        except (OSError, ValueError) as err:
            raise ModelLoadError(f"cannot load the tokenizer of {folder}: {err}") from None
    return model, tokenizer


# ---------------------------------------------------------------------------- masked objects
def square_crop(image: Image.Image) -> Image.Image:
    """The centre square of an image (what training sees, before resizing)."""
    side = min(image.size)
    left, top = (image.width - side) // 2, (image.height - side) // 2
    return image.crop((left, top, left + side, top + side))


def square(image: Image.Image, fill: tuple[int, int, int]) -> Image.Image:
    """Pad an image to a square with `fill`, centred (no pixel is cut)."""
    if image.width == image.height:
        return image
    side = max(image.size)
    out = Image.new("RGB", (side, side), fill)
    out.paste(image, ((side - image.width) // 2, (side - image.height) // 2))
    return out


def binary_mask(mask: Image.Image, size: tuple[int, int]) -> torch.Tensor:
    """A mask image (white = object) -> bool (H, W) at `size` (H, W), nearest."""
    m = mask.convert("L")
    if m.size != (size[1], size[0]):
        m = m.resize((size[1], size[0]), Image.Resampling.NEAREST)
    return torch.from_numpy(np.asarray(m) > 127)


def attention_mask(attention: torch.Tensor, size: tuple[int, int], threshold: float) -> torch.Tensor:
    """A concept's map (h, w) -> bool (H, W): max-normalised, bilinear, > threshold (as AttnMask and IoU)."""
    if float(attention.float().max()) <= 0:
        return torch.zeros(size, dtype=torch.bool)
    return upsample_map(attention, size) > threshold


def masked_object(image: Image.Image, mask: torch.Tensor, fill: tuple[int, int, int]) -> Image.Image | None:
    """The object only: outside the mask set to `fill`, cropped to the mask's box, padded square (None: empty)."""
    image = image.convert("RGB")
    if tuple(mask.shape) != (image.height, image.width):
        raise ValueError(f"mask {tuple(mask.shape)} does not match the image {image.size[::-1]}")
    if not bool(mask.any()):
        return None
    rows, cols = torch.nonzero(mask.any(1)).flatten(), torch.nonzero(mask.any(0)).flatten()
    top, bottom, left, right = int(rows[0]), int(rows[-1]) + 1, int(cols[0]), int(cols[-1]) + 1
    pixels = np.asarray(image).copy()
    pixels[~mask.numpy()] = fill
    return square(Image.fromarray(pixels).crop((left, top, right, bottom)), fill)


# ---------------------------------------------------------------------------- the metric
@dataclass
class ConceptSamples:
    """What the metric needs of one concept on one training image."""

    token: str
    source: Image.Image  # the training image, centre-cropped to a square
    source_mask: torch.Tensor  # bool (H, W) of `source`: ground truth, else the concept's own attention
    generations: list[Image.Image]  # its samples
    generation_maps: list[torch.Tensor | None]  # its attention in each sample (None: the whole sample)
    text: str | None = None  # the sample prompt in the concept's own words, for clip_t
    threshold: float = 0.5  # the job's mask_threshold


def generated_objects(item: ConceptSamples, fill: tuple[int, int, int]) -> list[Image.Image]:
    """Each generation masked by the concept's own attention in it (the whole image where it has none)."""
    out = []
    for image, attention in zip(item.generations, item.generation_maps, strict=True):
        obj = None
        if attention is not None:
            obj = masked_object(image, attention_mask(attention, (image.height, image.width), item.threshold), fill)
        out.append(obj if obj is not None else image.convert("RGB"))
    return out


def concept_fidelity(models: Sequence[FeatureModel], item: ConceptSamples) -> dict[str, float]:
    """{fidelity_<kind>: mean masked similarity, clip_t: mean text-image similarity} for one concept on one
    image; {} when its source mask is empty or it has no generations."""
    if not item.generations:
        return {}
    out: dict[str, float] = {}
    for model in models:
        source = masked_object(item.source, item.source_mask, model.fill)
        if source is None:
            return {}
        if model.key not in out:
            ref = model.image_features([source])
            gen = model.image_features(generated_objects(item, model.fill))
            out[model.key] = round(float((gen @ ref.T).mean()), 6)
        if model.has_text and item.text and TEXT_KEY not in out:
            text = model.text_features([item.text])
            whole = model.image_features([g.convert("RGB") for g in item.generations])
            out[TEXT_KEY] = round(float((whole @ text.T).mean()), 6)
    return out


def concept_words(prompt: str, token: str, initializer: str | None, adjective: str | None) -> str:
    """The sample prompt with the learned token replaced by the concept's own words (adjective + initializer)."""
    words = " ".join(w for w in (adjective, initializer) if w)
    return prompt.replace(token, words or "object")


def is_fidelity_key(name: str) -> bool:
    """Whether a per-concept metric is one of this module's (`fidelity_<kind>`, `clip_t`)."""
    return name.startswith(KEY_PREFIX) or name == TEXT_KEY


def load_models(paths: Sequence[str | Path | None], device: str | None = None) -> list[FeatureModel]:
    """The feature models of the non-empty paths (the fidelity folder, the CLIP folder), each loaded once."""
    return [load_feature_model(p, device) for p in dict.fromkeys(str(p) for p in paths if p)]
