"""Every training knob in one typed object, with the paper's values documented beside ours.

A config is hashed into job ids, so two runs with equal configs are the same work.

Limits. Every field has bounds (the Field's ge/le), checked wherever a config is made:
a table row's `overrides` (rejected with the field named), `--set`, `--config`, flow
parameters. They are far beyond any sensible run and exist to refuse nonsense (a row
with `steps: 1000000000000` used to run), not to tune. Floats must be finite.

| field | bounds | why |
|---|---|---|
| steps | 1 .. 100,000 | 16x the paper's 6100; more is a typo or an attack on the machine |
| batch_size | 1 .. 64 | memory: 64 x 512 px latents already need a large GPU |
| num_vectors | 1 .. 16 | each vector is a prompt token; the prompt must still fit 77 tokens |
| learning_rate | (0, 1] | the paper's largest is 5e-3 x batch 4 = 0.02 |
| lr_warmup_steps, mask_warmup_steps | 0 .. 100,000 | as steps |
| seed | 0 .. 2**32 - 1 | what every random generator (torch, numpy) accepts |
| resolution | 8 .. 2048, a multiple of 8 | the VAE downsamples by 8; 2048 px is beyond every SD model |
| attention_layers | at most 64 names | there are 16 cross-attention layers in SD 1.x |
| attention_downscale | 1 .. 64 | |
| cl_weight | 0 .. 100 | paper: 5e-4 to 1.0 |
| cl_temperature | 0.001 .. 10 | paper: 0.07 to 0.3; smaller overflows the softmax |
| cl_views | 2 .. 8 | each view is one more text-encoder pass per sample |
| flip_p, phrase_shuffle | 0 .. 1 | probabilities |
| checkpoint_every | 1 .. 100,000 | |
| keep_checkpoints | 1 .. 100 | each is a full optimiser state on disk |
| map_timesteps | 1 .. 100 | each is one more UNet pass per image at export |

Row-level limits that are not training settings (image size, sentence length, path
length, JSON size) are in `mcpl.pipeline.data` and, with these, in docs/DATA.md.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from mcpl.errors import ConfigError

Strategy = Literal["one", "all", "diverse"]
MaskSource = Literal["current", "running"]


# Fields added after job ids were first issued, with the value all earlier work implicitly had: hashed only
# when set to something else (TrainConfig.job_hash), whatever the field's default is now.
HASHED_ONLY_WHEN_SET: dict[str, object] = {"cl_reorder": False, "phrase_shuffle": 0.0}


class TrainConfig(BaseModel):
    """Configuration of one MCPL job (one image, or one MCPL-diverse group)."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    # --- what learns --------------------------------------------------------------
    strategy: Strategy = Field(
        "one", description="'one': a word per concept; 'all': every word of the sentence; "
        "'diverse': several images share their concepts' words (paper: MCPL-one is best)."
    )
    num_vectors: int = Field(1, ge=1, le=16, description="Vectors per learned token (tok, tok_1, ...); "
                             "at most 16: each is a prompt token and the prompt must fit the model's limit.")

    # --- optimisation -------------------------------------------------------------
    steps: int = Field(500, ge=1, le=100_000, description="Optimisation steps (paper: 6100 on LDM-1.4B; "
                       "at most 100,000, 16x the paper: more is a typo).")
    batch_size: int = Field(4, ge=1, le=64, description="Samples per step (paper: 4; at most 64, for memory).")
    learning_rate: float | None = Field(
        None, gt=0, le=1.0, allow_inf_nan=False, description="AdamW lr. None: scale with the model's mean "
        "token-embedding norm (lr = 1.3e-3 x batch x norm; 2e-3 for SD 1.x at batch 4; paper: 5e-3 x batch "
        "on LDM). At most 1: the paper's largest is 0.02.",
    )
    lr_warmup_steps: int = Field(0, ge=0, le=100_000, description="Linear warm-up, then constant.")
    seed: int = Field(0, ge=0, le=2**32 - 1, description="Seeds every random draw: same seed, same result "
                      "(0 .. 2**32-1: what torch and numpy generators accept).")
    resolution: int | None = Field(
        None, ge=8, le=2048, multiple_of=8, description="Training side in pixels, a multiple of 8 (the VAE "
        "downsamples by 8) up to 2048. None: the UNet's sample size x VAE factor."
    )
    flip_p: float = Field(0.5, ge=0, le=1, description="Probability of a horizontal flip (paper: 0.5).")
    use_templates: bool = Field(
        True, description="Wrap the sentence in random templates ('a photo of {}') that never "
        "contain a learnable word or an adjective.",
    )
    phrase_shuffle: float = Field(
        0.5, ge=0, le=1, allow_inf_nan=False, description="Probability that a sample's prompt lists the "
        "sentence's phrases in another order ('a blue <b> and a red <a>'): the image is the same, and every "
        "word is also trained where it is the first of the sentence, which is how it is used alone ('a <b>'). "
        "Phrases that read the same without their learned words ('a <a|object> and a <b|object>') are never "
        "reordered: their place is all that tells the words apart. Not in the paper (0: its prompts keep the "
        "written order); 0.5 chosen on the toy model's validation scenes: recovery +10 to +28 points for "
        "MCPL-all, MCPL-one and full MCPL with coloured sentences, second-named words 44-48 % -> 70-72 % "
        "(benchmarks/results/toyworld_sweep_shuffle_{bare_shuffled,three}.md).",
    )

    # --- AttnMask -----------------------------------------------------------------
    attn_mask: bool = Field(False, description="Mask the noise loss by the learned words' attention.")
    mask_threshold: float = Field(
        0.5, gt=0, lt=1, description="k: a map divided by its max is kept where > k "
        "(paper text 0.5, paper code 0.3; 0.5 chosen by the toy benchmark's sweep).",
    )
    mask_source: MaskSource = Field(
        "current", description="'current': this step's map (paper code; chosen by the toy sweep); "
        "'running': mean over training steps per image and concept (paper text's average over timesteps).",
    )
    mask_warmup_steps: int = Field(0, ge=0, le=100_000, description="Steps of unmasked loss before masking starts.")
    attention_layers: list[str] | None = Field(
        None, max_length=64, description="Substrings of cross-attention processor names to record (at most "
        "64; SD 1.x has 16 such layers). None: the layers at `attention_downscale`.",
    )
    attention_downscale: int | None = Field(
        None, ge=1, le=64, description="Record cross-attention layers whose map is the latent side / this. "
        "None: the model's recommendation, else 4 (SD 1.x at 512 px: 16x16 maps, as the paper).",
    )

    # --- PromptCL / Bind adj ------------------------------------------------------
    prompt_cl: bool = Field(False, description="InfoNCE between the learned words' encoder features.")
    cl_weight: float = Field(5e-2, ge=0, le=100, allow_inf_nan=False,
                             description="lambda (paper: 5e-4 to 1.0; toy sweep: 0.05).")
    cl_temperature: float = Field(0.07, ge=1e-3, le=10, allow_inf_nan=False, description="tau (paper: 0.07 to "
                                  "0.3; toy sweep: 0.07); at least 0.001, smaller overflows the softmax.")
    cl_views: int = Field(2, ge=2, le=8, description="Prompt views per sample (different templates); at most 8, "
                          "each is one more text-encoder pass.")
    cl_reorder: bool = Field(False, description="PromptCL's extra views list the sentence's phrases ('a red <a> "
                             "and a blue <b>') in another order, so views differ even where the model knows one "
                             "template. Off by default: on the toy model it cost 23 +/- 16 recovery points on bare "
                             "sentences and changed nothing on coloured ones (benchmarks/results/toyworld_sweep_"
                             "lambda_*.md); the views then differ only by template.")
    bind_adj: bool = Field(False, description="Each concept's adjective joins its positives.")

    # --- bookkeeping --------------------------------------------------------------
    checkpoint_every: int = Field(100, ge=1, le=100_000, description="Write a resumable checkpoint every N steps.")
    keep_checkpoints: int = Field(2, ge=1, le=100, description="How many recent checkpoints to keep (at most "
                                  "100: each is a full optimiser state).")
    map_timesteps: int = Field(8, ge=1, le=100, description="Timesteps averaged for the exported image maps "
                               "(at most 100: each is a UNet pass per image).")

    def job_hash(self) -> str:
        """A short stable hash of the fields that change what is learned (not bookkeeping). Fields added
        after job ids were first issued count only when set away from the value earlier work had, so
        existing work keeps its id (and its finished bundles stay finished)."""
        fields = self.model_dump(exclude={"checkpoint_every", "keep_checkpoints"})
        for name, earlier in HASHED_ONLY_WHEN_SET.items():
            if fields[name] == earlier:
                del fields[name]
        return hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()[:16]

    @classmethod
    def full_mcpl(cls, **overrides: object) -> TrainConfig:
        """MCPL-one with AttnMask, PromptCL and Bind adj: the paper's full method."""
        return cls(**{"attn_mask": True, "prompt_cl": True, "bind_adj": True, **overrides})


FULL_MCPL = {"attn_mask": True, "prompt_cl": True, "bind_adj": True}


def parse_overrides(pairs: Sequence[str]) -> dict[str, object]:
    """Parse `key=value` strings (values as JSON where they parse, else strings)."""
    out: dict[str, object] = {}
    for pair in pairs:
        if "=" not in pair:
            raise ConfigError(f"expected key=value, got {pair!r}")
        key, raw = pair.split("=", 1)
        try:
            out[key.strip()] = json.loads(raw)
        except json.JSONDecodeError:
            out[key.strip()] = raw
    return out


def load_config_file(spec: str | Path) -> dict[str, object]:
    """`FILE` or `FILE:SECTION` (dotted, e.g. `params.yaml:train`) -> a mapping of TrainConfig fields."""
    import yaml

    spec = str(spec)
    path, _, section = spec.partition(":") if not Path(spec).exists() else (spec, "", "")
    try:
        data = yaml.safe_load(Path(path).read_text()) or {}
    except (OSError, yaml.YAMLError) as err:
        raise ConfigError(f"cannot read config file {path}: {err}") from err
    for key in filter(None, section.split(".")):
        if not isinstance(data, dict) or key not in data:
            raise ConfigError(f"{path} has no section {section!r}")
        data = data[key]
    if not isinstance(data, dict):
        raise ConfigError(f"{spec} is not a mapping of TrainConfig fields")
    return data


def config_errors(err: ValidationError) -> list[str]:
    """One readable line per invalid field of a pydantic error."""
    return [f"{'.'.join(str(x) for x in e['loc']) or 'config'}: {e['msg']}" for e in err.errors()]


def make_config(fields: Mapping[str, object]) -> TrainConfig:
    """TrainConfig(**fields), with invalid fields reported as one ConfigError."""
    try:
        return TrainConfig(**fields)
    except ValidationError as err:
        raise ConfigError("invalid training settings: " + "; ".join(config_errors(err))
                          + " (see `mcpl train --help` / mcpl/config.py)") from None
    except TypeError as err:
        raise ConfigError(f"invalid training settings: {err}") from None


@dataclass(frozen=True)
class ConfigSource:
    """Where a run's TrainConfig comes from; `for_job` is the one place a job's config is made.

    Layers, later wins: the defaults -> `file` (params.yaml section or --config) -> `fields`
    (command flags or flow parameters) -> the row's own `overrides` -> `sets` (`--set`, the
    command line's last word). Then the strategy follows the job's shape: a group trains
    MCPL-diverse, a single image never does. Fields left None (learning_rate, resolution,
    attention_downscale) are resolved from the model when the job starts (its hints file,
    else its size) and recorded in job.json.
    """

    file: Mapping[str, object] = field(default_factory=dict)
    fields: Mapping[str, object] = field(default_factory=dict)
    sets: Mapping[str, object] = field(default_factory=dict)

    @classmethod
    def from_options(cls, config_file: str | None = None, fields: Mapping[str, object] | None = None,
                     sets: Sequence[str] = (), full: bool = False) -> ConfigSource:
        """From CLI-shaped options: `--config FILE[:SECTION]`, flags, `--set k=v` and `--full`."""
        flags = {**(FULL_MCPL if full else {}), **{k: v for k, v in (fields or {}).items() if v is not None}}
        return cls(load_config_file(config_file) if config_file else {}, flags, parse_overrides(sets))

    def base(self) -> TrainConfig:
        """The batch-wide config (no row overrides): for lineage and the batch run's params."""
        return make_config({**self.file, **self.fields, **self.sets})

    def for_job(self, overrides: Mapping[str, object] | None = None, group: str | None = None,
                images: int = 1) -> TrainConfig:
        """The config of one job: every layer, then the strategy that fits the job's shape."""
        merged = {**TrainConfig().model_dump(), **self.file, **self.fields, **(overrides or {}), **self.sets}
        if group is not None or images > 1:
            merged["strategy"] = "diverse"
        elif merged.get("strategy") == "diverse":
            merged["strategy"] = "one"
        return make_config(merged)

    def to_dict(self) -> dict[str, dict]:
        return {"file": dict(self.file), "fields": dict(self.fields), "sets": dict(self.sets)}

    @classmethod
    def from_dict(cls, data: Mapping[str, Mapping]) -> ConfigSource:
        return cls(dict(data.get("file", {})), dict(data.get("fields", {})), dict(data.get("sets", {})))


class RunOptions(BaseModel):
    """How jobs run (not what they learn): never part of a job's id."""

    model_config = ConfigDict(extra="forbid")

    device: str | None = Field(None, description="cpu, cuda, cuda:1 ... (None: cuda if available).")
    threads: int | None = Field(None, ge=1, description="torch CPU threads per process (None: torch's choice).")
    samples: int = Field(2, ge=0, le=64, description="Generations per concept after training (0: none).")
    sample_steps: int = Field(25, ge=1, le=1000, description="DDIM steps of those generations.")
    progress: bool = Field(True, description="Progress bars (for a person watching one job).")
    log: bool = Field(True, description="One line per job event on stderr.")
    skip_done: bool = Field(True, description="Skip jobs whose bundle is already finished.")
    keep_checkpoints: bool = Field(True, description="Keep a finished job's checkpoints/ (resumable state).")
    gradient_checkpointing: bool = Field(False, description="Recompute UNet activations in the backward pass: "
                                         "less memory (1024 px SDXL on one GPU), ~30 % slower.")
    fidelity_model: str | None = Field(None, description="A local transformers folder of a DINOv2, DINO (ViT) "
                                       "or CLIP model: each concept's masked similarity between its samples and "
                                       "its object (`fidelity_<type>`, docs/FIDELITY.md). Needs samples >= 1.")
    clip_model: str | None = Field(None, description="A local CLIP folder with its tokenizer: `clip_t`, text-image "
                                   "similarity of each concept's samples with its own words (and fidelity_clip).")
