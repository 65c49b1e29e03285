"""How much does MCPL cost per step over plain textual inversion?

Median ms/step, same process, same model, same batch, for:
  bare     a frozen-UNet forward + backward with one trainable embedding row (reference)
  one      MCPL-one: one row per concept, no regularisers
  full     MCPL-one + AttnMask + PromptCL + Bind adj
on the tiny test model and on a UNet / text encoder with Stable Diffusion 1.5's published
architecture and random weights (speed does not depend on the weights).
Variants share the frozen modules and alternate step by step (each step re-activates its
variant's embedding module and attention processors, untimed), so a busy machine slows all
three alike and the ratios stay meaningful.

    python benchmarks/step_overhead.py                  # both models, writes benchmarks/results/step_overhead.json
    python benchmarks/step_overhead.py --models tiny --steps 20
Target: full <= 1.10 x bare.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch  # noqa: E402
from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel  # noqa: E402
from diffusers.models.attention_processor import AttnProcessor2_0  # noqa: E402
from transformers import CLIPTextConfig, CLIPTextModel  # noqa: E402

from mcpl.config import TrainConfig  # noqa: E402
from mcpl.method.inputs import JobInput
from mcpl.method.learned import LearnedTokenEmbedding  # noqa: E402
from mcpl.method.models import Components, load_components  # noqa: E402
from mcpl.method.tiny import build_tiny_model, build_tiny_tokenizer  # noqa: E402
from mcpl.method.trainer import MCPLTrainer  # noqa: E402

SENTENCE = "a photo of a red <c1|object|red> and a blue <c2|thing|blue>"
OUT = Path(__file__).parent / "results" / "step_overhead.json"


def sd15_components(device: torch.device) -> Components:
    """SD 1.5's UNet/text-encoder/VAE architecture with random weights (no download possible)."""
    torch.manual_seed(0)
    tokenizer = build_tiny_tokenizer(Path(tempfile.mkdtemp()) / "tok", max_length=77)
    # the vocabulary is the small test tokenizer's (embedding size does not change step time)
    text_encoder = CLIPTextModel(CLIPTextConfig(vocab_size=len(tokenizer), hidden_size=768, intermediate_size=3072,
                                                num_hidden_layers=12, num_attention_heads=12,
                                                max_position_embeddings=77, hidden_act="quick_gelu",
                                                bos_token_id=0, eos_token_id=1, pad_token_id=1))
    unet = UNet2DConditionModel(sample_size=32, cross_attention_dim=768)
    vae = AutoencoderKL(block_out_channels=(128, 256, 512, 512), layers_per_block=2, latent_channels=4,
                        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4)
    scheduler = DDPMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", steps_offset=1)
    for m in (text_encoder, unet, vae):
        m.requires_grad_(False).eval().to(device)
    return Components("sd15-architecture-random", tokenizer, text_encoder, unet, vae, scheduler, device,
                      torch.float32, {})


class Fresh:
    """Hands out the same frozen modules in their pristine state for each variant."""

    def __init__(self, components: Components) -> None:
        self.base = components
        self.embedding = components.text_encoder.get_input_embeddings()
        self.tokenizer = copy.deepcopy(components.tokenizer)

    def __call__(self) -> Components:
        c = self.base
        c.text_encoder.set_input_embeddings(self.embedding)
        c.unet.set_attn_processor(AttnProcessor2_0())
        return Components(c.name, copy.deepcopy(self.tokenizer), c.text_encoder, c.unet, c.vae, c.scheduler,
                          c.device, c.dtype, c.hints)


def bare_step_fn(components: Components, batch: int):
    """Textual inversion reduced to its core: one new row, default attention, MSE, AdamW."""
    c = components
    c.tokenizer.add_tokens(["<bare>"])
    base = c.text_encoder.get_input_embeddings()
    module = LearnedTokenEmbedding(base, len(c.tokenizer) - 1, base.weight[:1].detach())
    c.text_encoder.set_input_embeddings(module)
    optimizer = torch.optim.AdamW([module.rows], lr=1e-3, weight_decay=0.0)
    ids = c.tokenizer(["a photo of <bare>"] * batch, padding="max_length", max_length=c.tokenizer.model_max_length,
                      return_tensors="pt").input_ids.to(c.device)
    side = c.default_resolution // c.vae_factor
    latents = torch.randn(batch, 4, side, side, device=c.device)

    def step() -> None:
        noise = torch.randn_like(latents)
        t = torch.randint(0, 1000, (batch,), device=c.device)
        pred = c.unet(c.scheduler.add_noise(latents, noise, t), t, encoder_hidden_states=c.text_encoder(ids)[0]).sample
        loss = torch.nn.functional.mse_loss(pred, noise)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()

    return step


def mcpl_step_fn(components: Components, batch: int, full: bool, resolution: int):
    from PIL import Image

    image = Image.new("RGB", (resolution, resolution), "white")
    image.paste((255, 0, 0), (0, 0, resolution // 2, resolution // 2))
    config = TrainConfig(batch_size=batch, steps=10**6, attn_mask=full, prompt_cl=full, bind_adj=full)
    trainer = MCPLTrainer(components, [JobInput.from_text(image, SENTENCE)], config, progress=False)
    return trainer.train_step


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def measure(fresh: Fresh, batch: int, steps: int, warmup: int) -> dict[str, float]:
    resolution = fresh.base.default_resolution
    variants = {}
    for name in ("bare", "one", "full"):
        c = fresh()
        step = bare_step_fn(c, batch) if name == "bare" else mcpl_step_fn(c, batch, name == "full", resolution)
        variants[name] = (step, c.text_encoder.get_input_embeddings(), dict(c.unet.attn_processors))
    times: dict[str, list[float]] = {name: [] for name in variants}
    for i in range(warmup + steps):
        for name, (step, embedding, processors) in variants.items():
            fresh.base.text_encoder.set_input_embeddings(embedding)
            fresh.base.unet.set_attn_processor(dict(processors))  # diffusers pops from the dict
            sync(fresh.base.device)
            start = time.perf_counter()
            step()
            sync(fresh.base.device)
            if i >= warmup:
                times[name].append((time.perf_counter() - start) * 1000)
    med = {k: statistics.median(v) for k, v in times.items()}
    return {"batch": batch, "resolution": resolution, "steps_measured": steps,
            "ms_per_step": {k: round(v, 2) for k, v in med.items()},
            "ratio_one": round(med["one"] / med["bare"], 3), "ratio_full": round(med["full"] / med["bare"], 3),
            "target_full_ratio": 1.10, "meets_target": med["full"] / med["bare"] <= 1.10}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default="tiny,sd15")
    parser.add_argument("--steps", type=int, default=20, help="measured steps per variant (tiny; sd15 gets 1/4)")
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
    for name in args.models.split(","):
        if name == "tiny":
            folder = build_tiny_model(Path(tempfile.mkdtemp()) / "tiny")
            fresh, batch, steps = Fresh(load_components(str(folder), device)), 4, args.steps
        elif name == "sd15":
            fresh, batch, steps = Fresh(sd15_components(device)), 1, max(4, args.steps // 4)
        else:
            raise SystemExit(f"unknown model {name!r}")
        results["models"][name] = measure(fresh, batch, steps, args.warmup)
        print(name, json.dumps(results["models"][name]), flush=True)
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
