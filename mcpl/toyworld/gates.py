"""Quality gates of the pretrained toy model; writes benchmarks/results/toyworld_gates.json.

    python -m mcpl.toyworld.gates --model models/toyworld

1. single-object captions (all 16 colour-shape pairs x seeds): the checker must find
   exactly one object; shape right >= 90 %, colour right >= 95 % (a duplicate is wrong).
2. two-object captions whose objects are both held-out pairs: whole image right >= 70 %.
3. attention: each colour/shape word's cross-attention map (mean over heads, the 16x16
   layers, and noise levels), divided by its max and cut at 0.3, vs the 16x16 object masks
   of rendered held-out two-object scenes: mean IoU >= 0.4 with its own object and
   <= 0.1 with the other. Other layer groups, cuts and generated images are reported too.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from mcpl.toyworld import checker as C  # noqa: E402
from mcpl.toyworld.model import RawAttention, install_raw_capture  # noqa: E402
from mcpl.toyworld.render import ALL_PAIRS, HELDOUT_PAIRS, caption, render, sample_scene  # noqa: E402

CUTS = (0.2, 0.3, 0.5)
GATE_CUT = 0.3
GATE_GROUP = "res16"
NOISE_T = (100, 300, 500, 700)


class ToyModel:
    """The exported pipeline's components plus attention recording."""

    def __init__(self, path: str | Path) -> None:
        from diffusers import DDIMScheduler, StableDiffusionPipeline

        pipe = StableDiffusionPipeline.from_pretrained(str(path))
        self.tok, self.text, self.unet, self.vae = pipe.tokenizer, pipe.text_encoder, pipe.unet, pipe.vae
        self.sched = DDIMScheduler.from_config(pipe.scheduler.config)
        for m in (self.text, self.unet, self.vae):
            m.eval().requires_grad_(False)
        self.store = RawAttention()
        self.layers = install_raw_capture(self.unet, self.store)

    def encode(self, prompts: list[str]) -> torch.Tensor:
        ids = self.tok(
            prompts,
            padding="max_length",
            max_length=self.tok.model_max_length,
            truncation=True,
            return_tensors="pt",
        ).input_ids
        return self.text(ids)[0]

    def _collect(self, sums: dict, cond_slice: slice) -> None:
        """Add this UNet call's head-mean maps (samples in `cond_slice`) into `sums`."""
        for name, maps in self.store.maps.items():
            heads = self.store.heads[name]
            for probs in maps:
                p = probs.reshape(-1, heads, *probs.shape[1:])[cond_slice].mean(1)
                sums[name] = sums.get(name, 0) + p
        self.store.clear()

    @torch.no_grad()
    def sample(
        self,
        prompts: list[str],
        seeds: list[int],
        steps: int = 30,
        guidance: float = 5.0,
        record: bool = False,
    ) -> tuple[np.ndarray, dict]:
        """Images (B,32,32,3 uint8) and, if `record`, per-layer maps summed over steps."""
        b = len(prompts)
        cond = self.encode(prompts)
        uncond = self.encode([""] * b)
        lat = torch.stack([torch.randn(4, 16, 16, generator=torch.Generator().manual_seed(s)) for s in seeds])
        self.sched.set_timesteps(steps)
        lat = lat * self.sched.init_noise_sigma
        sums: dict = {}
        for t in self.sched.timesteps:
            self.store.clear()
            self.store.enabled = record
            x = self.sched.scale_model_input(torch.cat([lat, lat]), t)
            eps = self.unet(x, t, encoder_hidden_states=torch.cat([uncond, cond])).sample
            self.store.enabled = False
            if record:
                self._collect(sums, slice(b, 2 * b))
            eu, ec = eps.chunk(2)
            lat = self.sched.step(eu + guidance * (ec - eu), t, lat).prev_sample
        img = self.vae.decode(lat / self.vae.config.scaling_factor).sample
        img = ((img.clamp(-1, 1) + 1) * 127.5).round().byte().permute(0, 2, 3, 1).numpy()
        return img, {k: v / steps for k, v in sums.items()}

    @torch.no_grad()
    def noised_maps(self, images: np.ndarray, prompts: list[str], seed: int = 0) -> dict:
        """Per-layer maps for real images noised at NOISE_T (what MCPL's AttnMask sees)."""
        x = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 127.5 - 1
        z0 = self.vae.encode(x).latent_dist.mean * self.vae.config.scaling_factor
        cond = self.encode(prompts)
        b = len(prompts)
        g = torch.Generator().manual_seed(seed)
        sums: dict = {}
        for t in NOISE_T:
            tt = torch.full((b,), t)
            zt = self.sched.add_noise(z0, torch.randn(z0.shape, generator=g), tt)
            self.store.clear()
            self.store.enabled = True
            self.unet(zt, tt, encoder_hidden_states=cond)
            self.store.enabled = False
            self._collect(sums, slice(0, b))
        return {k: v / len(NOISE_T) for k, v in sums.items()}


def group_map(maps: dict, group: str) -> torch.Tensor:
    """(B,16,16,L) mean map of a layer group: res16, res8 (upsampled) or all."""
    out = []
    for p in maps.values():
        side = int(round(p.shape[1] ** 0.5))
        if group == "res16" and side != 16 or group == "res8" and side != 8:
            continue
        m = p.reshape(p.shape[0], side, side, -1).permute(0, 3, 1, 2)
        out.append(F.interpolate(m, size=(16, 16), mode="nearest").permute(0, 2, 3, 1))
    return torch.stack(out).mean(0)


def iou(a: np.ndarray, b: np.ndarray) -> float:
    u = (a | b).sum()
    return float((a & b).sum() / u) if u else 0.0


def word_ious(maps: dict, masks16: list[list[np.ndarray]]) -> dict:
    """Mean own/other IoU per (group, cut) for colour and shape words of 2-object captions."""
    res = {}
    for group in ("res16", "res8", "all"):
        gm = group_map(maps, group)
        for cut in CUTS:
            own, other = [], []
            for i, masks in enumerate(masks16):
                for k in range(2):
                    for pos in (2 + 4 * k, 3 + 4 * k):
                        m = gm[i, :, :, pos]
                        hit = (m / (m.max() + 1e-12) >= cut).numpy()
                        own.append(iou(hit, masks[k]))
                        other.append(iou(hit, masks[1 - k]))
            res[f"{group}@{cut}"] = {
                "own": float(np.mean(own)),
                "other": float(np.mean(other)),
                "words": len(own),
            }
    return res


def _mask16(mask32: np.ndarray) -> np.ndarray:
    return mask32.reshape(16, 2, 16, 2).mean(axis=(1, 3)) >= 0.5


def heldout_two() -> list[list[tuple[str, str]]]:
    return [[a, b] for a in HELDOUT_PAIRS for b in HELDOUT_PAIRS if a != b]


def run_gates(
    model_dir: str,
    n_seeds_single: int = 7,
    n_seeds_two: int = 9,
    steps: int = 30,
    guidance: float = 5.0,
    batch: int = 64,
    n_attn: int = 48,
) -> dict:
    t0 = time.time()
    model = ToyModel(model_dir)
    chk = C.Checker.load()
    info_path = Path(model_dir) / "toyworld_pretrain.json"
    info = json.loads(info_path.read_text()) if info_path.exists() else {}

    # Gate 1: single objects.
    singles = [(p, s) for p in ALL_PAIRS for s in range(n_seeds_single)]
    res1 = {"n": 0, "colour": 0, "shape": 0, "both": 0, "count_wrong": 0, "heldout_n": 0, "heldout_both": 0}
    for i in range(0, len(singles), batch):
        chunk = singles[i : i + batch]
        imgs, _ = model.sample(
            [caption([p]) for p, _ in chunk],
            [10_000 + 97 * ALL_PAIRS.index(p) + s for p, s in chunk],
            steps,
            guidance,
        )
        for (pair, _), img in zip(chunk, imgs, strict=True):
            found = chk.read(img)
            one = len(found) == 1
            res1["n"] += 1
            res1["count_wrong"] += not one
            res1["colour"] += one and found[0].colour == pair[0]
            res1["shape"] += one and found[0].shape == pair[1]
            ok = one and found[0].pair() == pair
            res1["both"] += ok
            if pair in HELDOUT_PAIRS:
                res1["heldout_n"] += 1
                res1["heldout_both"] += ok
    single = {
        "prompts": res1["n"],
        "colour_acc": res1["colour"] / res1["n"],
        "shape_acc": res1["shape"] / res1["n"],
        "both_acc": res1["both"] / res1["n"],
        "wrong_count_rate": res1["count_wrong"] / res1["n"],
        "heldout_pairs_both_acc": res1["heldout_both"] / max(1, res1["heldout_n"]),
    }
    single["pass"] = single["shape_acc"] >= 0.90 and single["colour_acc"] >= 0.95

    # Gate 2: two held-out objects, whole image right; attention on generated images too.
    twos = [(objs, s) for objs in heldout_two() for s in range(n_seeds_two)]
    ok2, gen_maps, gen_masks = 0, [], []
    for i in range(0, len(twos), batch):
        chunk = twos[i : i + batch]
        imgs, maps = model.sample(
            [caption(o) for o, _ in chunk],
            [20_000 + 31 * j + s for j, (_, s) in enumerate(chunk, i)],
            steps,
            guidance,
            record=True,
        )
        for j, ((objs, _), img) in enumerate(zip(chunk, imgs, strict=True)):
            found = chk.read(img)
            right = C.matches(found, objs)
            ok2 += right
            if right:
                segs = {f.pair(): f.mask for f in found}
                gen_masks.append([_mask16(segs[o]) for o in objs])
                gen_maps.append({k: v[j : j + 1] for k, v in maps.items()})
    two = {"prompts": len(twos), "whole_image_acc": ok2 / len(twos)}
    two["pass"] = two["whole_image_acc"] >= 0.70

    # Gate 3: attention on rendered held-out two-object scenes (exact masks).
    scenes = [render(sample_scene(30_000 + i, forced=heldout_two()[i % 12])) for i in range(n_attn)]
    maps = model.noised_maps(np.stack([r.image for r in scenes]), [r.caption for r in scenes])
    attn = word_ious(maps, [[_mask16(m) for m in r.masks] for r in scenes])
    gate = attn[f"{GATE_GROUP}@{GATE_CUT}"]
    attention = {
        "rendered": attn,
        "gate_setting": f"{GATE_GROUP}@{GATE_CUT}",
        "own_iou": gate["own"],
        "other_iou": gate["other"],
        "pass": gate["own"] >= 0.4 and gate["other"] <= 0.1,
    }
    if gen_maps:
        merged = {k: torch.cat([m[k] for m in gen_maps]) for k in gen_maps[0]}
        attention["generated"] = word_ious(merged, gen_masks)

    # Context: checker accuracy on renders and on VAE reconstructions of renders.
    eval_seeds = range(3_000_000, 3_000_400)
    ck = C.evaluate(chk, eval_seeds)
    recon_ok = 0
    for i in range(0, len(eval_seeds), 100):
        rs = [render(sample_scene(s, pairs=ALL_PAIRS)) for s in eval_seeds[i : i + 100]]
        x = torch.from_numpy(np.stack([r.image for r in rs])).permute(0, 3, 1, 2).float() / 127.5 - 1
        with torch.no_grad():
            rec = model.vae.decode(model.vae.encode(x).latent_dist.mean).sample
        rec = ((rec.clamp(-1, 1) + 1) * 127.5).round().byte().permute(0, 2, 3, 1).numpy()
        recon_ok += sum(
            C.matches(chk.read(im), [(o.colour, o.shape) for o in r.scene.objects])
            for r, im in zip(rs, rec, strict=True)
        )
    return {
        "model": model_dir,
        "model_step": info.get("step"),
        "sampler": f"DDIM {steps} steps, CFG {guidance}",
        "single_object": single,
        "two_object_heldout": two,
        "attention": attention,
        "checker_on_renders": ck,
        "checker_on_vae_reconstructions": recon_ok / len(eval_seeds),
        "seconds": round(time.time() - t0, 1),
    }


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description="Measure the toy model's quality gates.")
    ap.add_argument("--model", default="models/toyworld")
    ap.add_argument("--out", default="benchmarks/results/toyworld_gates.json")
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--guidance", type=float, default=5.0)
    ap.add_argument("--seeds-single", type=int, default=7)
    ap.add_argument("--seeds-two", type=int, default=9)
    ap.add_argument("--threads", type=int, default=1)
    a = ap.parse_args(argv)
    torch.set_num_threads(a.threads)
    res = run_gates(a.model, a.seeds_single, a.seeds_two, a.steps, a.guidance)
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(res, indent=1))
    print(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
