"""How much does MCPL cost per step over plain textual inversion?

Median ms/step, same process, same model, same batch, for:
  bare     a frozen-UNet forward + backward with one trainable embedding row (reference)
  one      MCPL-one: one row per concept, no regularisers
  full     MCPL-one + AttnMask + PromptCL + Bind adj
on the tiny test model and on Stable Diffusion 1.5's, SDXL's and LDM-256's published
architectures with random weights (benchmarks/architectures.py; speed does not depend on
the weights).
Variants share the frozen modules and alternate step by step (each step re-activates its
variant's embedding module and attention processors, untimed), so a busy machine slows all
three alike and the ratios stay meaningful.

    python benchmarks/step_overhead.py                  # every model, writes benchmarks/results/step_overhead.json
    python benchmarks/step_overhead.py --models tiny,sdxl:512 --steps 20
    python benchmarks/step_overhead.py --device cuda --models sd15:512,sdxl:1024 [--gradient-checkpointing]
Target: full <= 1.10 x bare.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402
from architectures import BUILDERS  # noqa: E402
from diffusers.models.attention_processor import AttnProcessor2_0  # noqa: E402

from mcpl.config import TrainConfig  # noqa: E402
from mcpl.method.families import Components  # noqa: E402
from mcpl.method.inputs import JobInput  # noqa: E402
from mcpl.method.learned import attached, learned_rows  # noqa: E402
from mcpl.method.prompts import parse_sentence, plan_prompts  # noqa: E402
from mcpl.method.trainer import MCPLTrainer  # noqa: E402

SENTENCE = "a photo of a red <c1|object|red> and a blue <c2|thing|blue>"
OUT = Path(__file__).parent / "results" / "step_overhead.json"
DEFAULT_RESOLUTION = {"tiny": 16, "sd15": 256, "sdxl": 512, "ldm256": 256}
DEFAULT_BATCH = {"tiny": 4, "sd15": 1, "sdxl": 1, "ldm256": 1}


class Fresh:
    """Hands out the same frozen modules in their pristine state for each variant."""

    def __init__(self, components: Components) -> None:
        self.base = components
        self.embeddings = [s.encoder.get_input_embeddings() for s in components.stacks]
        self.tokenizers = [copy.deepcopy(s.tokenizer) for s in components.stacks]

    def __call__(self) -> Components:
        c = self.base
        for stack, embedding in zip(c.stacks, self.embeddings, strict=True):
            stack.encoder.set_input_embeddings(embedding)
        c.unet.set_attn_processor(AttnProcessor2_0())
        stacks = [dataclasses.replace(s, tokenizer=copy.deepcopy(t)) for s, t in zip(c.stacks, self.tokenizers,
                                                                                     strict=True)]
        return dataclasses.replace(c, stacks=stacks)


def bare_step_fn(components: Components, batch: int, resolution: int):
    """Textual inversion reduced to its core: one new row per text encoder, default attention, MSE, AdamW."""
    c = components
    plan = plan_prompts([parse_sentence("a photo of <bare|object>")], "one", use_templates=False)
    rows = [learned_rows(s, plan) for s in c.stacks]
    optimizer = torch.optim.AdamW([r.rows for r in rows], lr=1e-3, weight_decay=0.0)
    ids = [s.tokenizer(["a photo of <bare>"] * batch, padding="max_length", max_length=s.length,
                       return_tensors="pt").input_ids.to(c.device) for s in c.stacks]
    sizes = c.family.size_conditioning([(resolution, resolution)] * batch, resolution)
    side = resolution // c.vae_factor
    latents = torch.randn(batch, 4, side, side, device=c.device, dtype=c.dtype)

    def step() -> None:
        noise = torch.randn_like(latents)
        t = torch.randint(0, 1000, (batch,), device=c.device)
        with attached(c.stacks, rows):
            cond = c.family.condition(c.stacks, ids, sizes)
        pred = c.unet(c.scheduler.add_noise(latents, noise, t), t, **cond.kwargs(c.dtype)).sample
        loss = torch.nn.functional.mse_loss(pred.float(), noise.float())
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()

    return step


def mcpl_step_fn(components: Components, batch: int, full: bool, resolution: int, gradient_checkpointing: bool):
    from PIL import Image

    image = Image.new("RGB", (resolution, resolution), "white")
    image.paste((255, 0, 0), (0, 0, resolution // 2, resolution // 2))
    config = TrainConfig(batch_size=batch, steps=100_000, attn_mask=full, prompt_cl=full, bind_adj=full,
                         resolution=resolution)
    trainer = MCPLTrainer(components, [JobInput.from_text(image, SENTENCE)], config, progress=False,
                          gradient_checkpointing=gradient_checkpointing)
    return trainer.train_step


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def measure(fresh: Fresh, batch: int, steps: int, warmup: int, resolution: int,
            gradient_checkpointing: bool = False) -> dict[str, float]:
    if gradient_checkpointing:
        fresh.base.unet.enable_gradient_checkpointing()
    variants = {}
    for name in ("bare", "one", "full"):
        c = fresh()
        step = bare_step_fn(c, batch, resolution) if name == "bare" else mcpl_step_fn(
            c, batch, name == "full", resolution, gradient_checkpointing)
        variants[name] = (step, dict(c.unet.attn_processors))
    times: dict[str, list[float]] = {name: [] for name in variants}
    if fresh.base.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(fresh.base.device)
    for i in range(warmup + steps):
        for name, (step, processors) in variants.items():
            fresh.base.unet.set_attn_processor(dict(processors))  # diffusers pops from the dict
            sync(fresh.base.device)
            start = time.perf_counter()
            step()
            sync(fresh.base.device)
            if i >= warmup:
                times[name].append((time.perf_counter() - start) * 1000)
    med = {k: statistics.median(v) for k, v in times.items()}
    spread = {k: [round(min(v), 2), round(max(v), 2)] for k, v in times.items()}
    peak = (round(torch.cuda.max_memory_allocated(fresh.base.device) / 2**30, 2)
            if fresh.base.device.type == "cuda" else None)
    return {"batch": batch, "resolution": resolution, "steps_measured": steps, "family": fresh.base.family.name,
            "dtype": str(fresh.base.dtype).removeprefix("torch."), "gradient_checkpointing": gradient_checkpointing,
            "ms_per_step": {k: round(v, 2) for k, v in med.items()}, "ms_min_max": spread, "peak_gib": peak,
            "ratio_one": round(med["one"] / med["bare"], 3), "ratio_full": round(med["full"] / med["bare"], 3),
            "target_full_ratio": 1.10, "meets_target": med["full"] / med["bare"] <= 1.10}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default="tiny,sd15,ldm256,sdxl",
                        help="comma list of " + ", ".join(BUILDERS) + " (a model:resolution suffix sets the side)")
    parser.add_argument("--steps", type=int, default=20, help="measured steps per variant (tiny; large ones get 1/4)")
    parser.add_argument("--dtype", default=None, help="float32 (CPU default) or bfloat16 (CUDA default)")
    parser.add_argument("--gradient-checkpointing", action="store_true")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--device", default=None)
    parser.add_argument("--out", default=str(OUT))
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    results = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor()
               or platform.machine(), "threads": torch.get_num_threads(), "torch": torch.__version__,
               "date": time.strftime("%Y-%m-%d"), "models": {}}
    dtype = getattr(torch, args.dtype) if args.dtype else (torch.bfloat16 if device.type == "cuda" else torch.float32)
    for item in args.models.split(","):
        name, _, side = item.partition(":")
        if name not in BUILDERS:
            raise SystemExit(f"unknown model {name!r}; choose from {', '.join(BUILDERS)}")
        resolution = int(side) if side else DEFAULT_RESOLUTION[name]
        components = BUILDERS[name](device, dtype if name != "tiny" else torch.float32, resolution)
        steps = args.steps if name == "tiny" else max(3, args.steps // 4)
        key = f"{name}@{resolution}" + ("+gc" if args.gradient_checkpointing else "")
        results["models"][key] = measure(Fresh(components), DEFAULT_BATCH[name], steps, args.warmup, resolution,
                                         args.gradient_checkpointing)
        print(key, json.dumps(results["models"][key]), flush=True)
        del components
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    if out.exists():  # keep other devices' figures side by side
        previous = json.loads(out.read_text())
        runs = [r for r in previous.get("runs", [previous]) if r.get("device") != results["device"]]
    else:
        runs = []
    out.write_text(json.dumps({"runs": runs + [results]}, indent=1))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
