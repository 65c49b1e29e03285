"""Pretrain the toy text-to-image model from scratch and export it as a diffusers folder.

    python -m mcpl.toyworld.pretrain --out models/toyworld --ckpt models/toyworld-ckpt

Stages: (1) render a fixed pool of training scenes (held-out colour-shape pairs never
appear), (2) train the VAE a few minutes, (3) cache VAE posteriors, (4) train UNet + text
encoder jointly with min-SNR weighting, EMA, caption dropout, a single-object curriculum
and a grounding loss on caption words. Every randomness is derived from (seed, step),
so a run resumed from a checkpoint continues exactly as the uninterrupted run would.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from tqdm import tqdm  # noqa: E402

from mcpl.method.checkpoint import list_checkpoints, load_latest, save_checkpoint  # noqa: E402
from mcpl.provenance import git_revision  # noqa: E402
from mcpl.toyworld import model as M  # noqa: E402
from mcpl.toyworld.render import TRAIN_PAIRS, caption, render, sample_scene  # noqa: E402
from mcpl.toyworld.tokenizer import build_tokenizer  # noqa: E402

MAX_OBJ = 3


@dataclass
class Config:
    """Every knob of a pretraining run (saved next to the checkpoints)."""

    out: str = "models/toyworld"
    ckpt: str = "models/toyworld-ckpt"
    seed: int = 0
    steps: int = 7000
    batch: int = 24
    lr: float = 1e-3
    warmup: int = 200
    min_lr_frac: float = 0.1
    ema: float = 0.998
    snr_gamma: float = 5.0
    p_empty: float = 0.1
    # Share of captions that name each object by one attribute only ("a yellow and a square"):
    # per object the colour or the shape word is dropped, so each word learns its own effect
    # (compositional generalisation); those captions get no grounding loss. 0 = the original recipe.
    p_partial: float = 0.0
    curriculum_steps: int = 2000  # steps with mostly single-object scenes
    ground_lambda: float = 0.05
    ground_tmax: int = 800
    ground_start: int = 200
    ground_scope: str = "multi"  # "multi" (scenes with >= 2 objects) or "all"
    ground_cover: float = 1.0  # weight of the coverage (cosine to mask) term, see grounding_loss
    ground_cover_start: int = 1400  # step the coverage term starts (added mid-run, see TOYWORLD.md)
    n_pool: tuple[int, int, int] = (6000, 10000, 8000)  # scenes with 1, 2, 3 objects
    vae_steps: int = 800
    vae_batch: int = 32
    vae_lr: float = 1e-3
    vae_kl: float = 1e-6
    ckpt_every: int = 200
    ckpt_keep: int = 2  # step folders kept in `ckpt`
    export_every: int = 500
    log_every: int = 25
    threads: int = 1
    # Start UNet, text encoder (and their EMA copies) from an exported model folder's weights
    # (the export holds the EMA) and use its VAE, instead of training from scratch.
    init_from: str = ""


# ----------------------------------------------------------------------------- data


@dataclass
class Pool:
    """Rendered training scenes, tensors aligned on the first axis."""

    images: torch.Tensor  # uint8 N,3,32,32
    masks16: torch.Tensor  # float N,3,16,16 soft coverage per object slot
    masks8: torch.Tensor  # float N,3,8,8
    n_obj: torch.Tensor  # long N
    ids: torch.Tensor  # long N,L token ids of the caption
    kind: torch.Tensor  # long N: number of objects (1..3), for the curriculum
    objects: list[list[tuple[str, str]]] | None = None  # (colour, shape) per object, caption order


def _pool_seed(seed: int, n: int, i: int) -> int:
    return (seed * 1_000_003 + n) * 10_000_019 + i


def build_pool(cfg: Config, tokenizer) -> Pool:
    """Render cfg.n_pool scenes from TRAIN_PAIRS only (deterministic in cfg.seed)."""
    imgs, m16, m8, nobj, caps, objs = [], [], [], [], [], []
    for n, count in zip((1, 2, 3), cfg.n_pool, strict=True):
        for i in range(count):
            r = render(sample_scene(_pool_seed(cfg.seed, n, i), n_objects=n, pairs=TRAIN_PAIRS))
            imgs.append(r.image.transpose(2, 0, 1))
            soft = np.zeros((MAX_OBJ, 32, 32), np.float32)
            for k, s in enumerate(r.soft_masks):
                soft[k] = s
            t = torch.from_numpy(soft)[None]
            m16.append(F.avg_pool2d(t, 2)[0])
            m8.append(F.avg_pool2d(t, 4)[0])
            nobj.append(n)
            caps.append(caption(r.scene.objects))
            objs.append([(o.colour, o.shape) for o in r.scene.objects])
    ids = tokenizer(
        caps,
        padding="max_length",
        max_length=tokenizer.model_max_length,
        truncation=True,
        return_tensors="pt",
    ).input_ids
    n_obj = torch.tensor(nobj)
    return Pool(torch.from_numpy(np.stack(imgs)), torch.stack(m16), torch.stack(m8), n_obj, ids, n_obj.clone(), objs)


def partial_caption(objects: list[tuple[str, str]], rng: np.random.Generator) -> str:
    """Each object by one attribute: 'a yellow and a square' (colour or shape word dropped)."""
    return " and ".join(f"a {c}" if rng.random() < 0.5 else f"a {s}" for c, s in objects)


def to_float(images: torch.Tensor) -> torch.Tensor:
    """uint8 [0,255] -> float [-1,1]."""
    return images.float() / 127.5 - 1.0


def word_positions(n_obj: torch.Tensor) -> torch.Tensor:
    """Token positions (B,3,2) of (colour, shape) per object slot in 'a c s and a c s ...'.

    Position 0 is <|startoftext|>; object k's words sit at 2+4k and 3+4k. Slots beyond
    n_obj point at position 0 and are masked out by the caller.
    """
    k = torch.arange(MAX_OBJ)
    pos = torch.stack([2 + 4 * k, 3 + 4 * k], dim=-1)  # 3,2
    pos = pos[None].expand(len(n_obj), -1, -1).clone()
    pos[k[None, :].expand(len(n_obj), -1) >= n_obj[:, None]] = 0
    return pos


# ----------------------------------------------------------------------------- io


def save_json_atomic(obj: dict, path: Path) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(obj, indent=1))
    os.replace(tmp, path)


def optimizer_tensors(opt: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict]:
    """Split an optimizer state dict into safetensors-able tensors and JSON."""
    sd = opt.state_dict()
    tensors = {}
    for idx, st in sd["state"].items():
        for k, v in st.items():
            tensors[f"{idx}.{k}"] = v if torch.is_tensor(v) else torch.tensor(v)
    return tensors, {"param_groups": sd["param_groups"]}


def load_optimizer(opt: torch.optim.Optimizer, tensors: dict[str, torch.Tensor], meta: dict) -> None:
    state: dict[int, dict] = {}
    for key, v in tensors.items():
        idx, name = key.split(".", 1)
        state.setdefault(int(idx), {})[name] = v
    opt.load_state_dict({"state": state, "param_groups": meta["param_groups"]})


def config_json(cfg: Config) -> dict:
    return json.loads(json.dumps(asdict(cfg)))


# Checkpoint tensors: one safetensors file per step folder (mcpl.method.checkpoint), keys
# prefixed by the module they belong to; optimizer state under "opt.<param>.<name>".
MODULE_PREFIXES = ("unet.", "text.", "ema_unet.", "ema_text.")
OPT_PREFIX = "opt."


def state_tensors(modules: dict[str, torch.nn.Module], opt: torch.optim.Optimizer) -> tuple[dict, dict]:
    tensors = {}
    for prefix, mod in modules.items():
        tensors.update({prefix + k: v for k, v in mod.state_dict().items()})
    ot, om = optimizer_tensors(opt)
    tensors.update({OPT_PREFIX + k: v for k, v in ot.items()})
    return tensors, om


def load_state_tensors(tensors: dict, opt_meta: dict, modules: dict[str, torch.nn.Module],
                       opt: torch.optim.Optimizer) -> None:
    for prefix, mod in modules.items():
        mod.load_state_dict({k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)})
    load_optimizer(opt, {k[len(OPT_PREFIX):]: v for k, v in tensors.items() if k.startswith(OPT_PREFIX)}, opt_meta)


# Defaults the MCPL trainer reads from the model folder (mcpl.models.HINTS_FILE): the toy
# model only ever saw bare captions ("a red circle and ..."), so prompt templates like
# "a photo of {}" would be out of its distribution; its 16x16 cross-attention layers
# (latent side / 1) are the ones that localise (docs/TOYWORLD.md, attention gate). Its
# learning rate was chosen by benchmarks/toyworld_sweep.py (stage "lr"): 3e-3 recovers shapes
# better than the embedding-norm rule's 1.2e-3 and still localises.
MCPL_HINTS = {"templates": ["{}"], "attention_downscale": 1, "learning_rate": 3e-3}


def write_hints(folder: Path, keep_from: tuple[Path, ...] = ()) -> None:
    """mcpl_hints.json: copied from the first of `keep_from` that has one, else MCPL_HINTS."""
    for old in (p / "mcpl_hints.json" for p in keep_from):
        if old.is_file():
            shutil.copyfile(old, folder / "mcpl_hints.json")
            return
    (folder / "mcpl_hints.json").write_text(json.dumps(MCPL_HINTS, indent=1) + "\n")


def export_pipeline(out: Path, vae, text_encoder, unet, tokenizer, info: dict | None = None,
                    hints_from: tuple[Path, ...] = ()) -> None:
    """Write a StableDiffusionPipeline folder (safetensors), replacing `out` atomically.

    `info` goes to toyworld_pretrain.json inside the new folder before the swap. Hints are
    kept: mcpl_hints.json comes from the folder being replaced, else from the first of
    `hints_from` that has one (the model training started from), else MCPL_HINTS.
    """
    from diffusers import StableDiffusionPipeline

    unet_x = M.build_unet()
    unet_x.load_state_dict(unet.state_dict())
    text_x = M.build_text_encoder(tokenizer)
    text_x.load_state_dict(text_encoder.state_dict())
    pipe = StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_x,
        tokenizer=tokenizer,
        unet=unet_x,
        scheduler=M.build_sample_scheduler(),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    tmp = out.with_name(out.name + ".tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    pipe.save_pretrained(str(tmp), safe_serialization=True)
    write_hints(tmp, (out, *hints_from))
    if info is not None:
        (tmp / "toyworld_pretrain.json").write_text(json.dumps(info, indent=1))
    old = out.with_name(out.name + ".old")
    if out.exists():
        if old.exists():
            shutil.rmtree(old)
        os.replace(out, old)
    os.replace(tmp, out)
    if old.exists():
        shutil.rmtree(old)


# ----------------------------------------------------------------------------- VAE


def train_vae(cfg: Config, pool: Pool, log) -> M.AutoencoderKL:
    """Reconstruction (L1) + tiny KL; then set scaling_factor = 1 / latent std."""
    torch.manual_seed(cfg.seed)
    vae = M.build_vae()
    opt = torch.optim.AdamW(vae.parameters(), lr=cfg.vae_lr, weight_decay=0.0)
    n = len(pool.images)
    g = torch.Generator().manual_seed(cfg.seed + 17)
    bar = tqdm(range(cfg.vae_steps), desc="vae", mininterval=30)
    for step in bar:
        lr = (
            cfg.vae_lr * min(1.0, (step + 1) / 100) * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * step / cfg.vae_steps)))
        )
        for group in opt.param_groups:
            group["lr"] = lr
        x = to_float(pool.images[torch.randint(0, n, (cfg.vae_batch,), generator=g)])
        post = vae.encode(x).latent_dist
        z = post.mean + post.std * torch.randn(post.mean.shape, generator=g)
        rec = vae.decode(z).sample
        loss = F.l1_loss(rec, x) + cfg.vae_kl * post.kl().mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if step % 50 == 0:
            bar.set_postfix(loss=f"{loss.item():.4f}", refresh=False)
            log({"stage": "vae", "step": step, "loss": loss.item()})
    vae.eval()
    with torch.no_grad():
        idx = torch.arange(0, n, max(1, n // 1000))
        mean = vae.encode(to_float(pool.images[idx])).latent_dist.mean
        rec = vae.decode(mean).sample
        psnr = -10 * torch.log10(((rec - to_float(pool.images[idx])) / 2).pow(2).mean())
    vae.register_to_config(scaling_factor=float(1.0 / mean.std()))
    log({"stage": "vae_done", "psnr": float(psnr), "scaling_factor": vae.config.scaling_factor})
    return vae


@torch.no_grad()
def encode_pool(vae, pool: Pool, batch: int = 256) -> tuple[torch.Tensor, torch.Tensor]:
    """Posterior mean and std of every pool image (scaled by the VAE scaling factor)."""
    means, stds = [], []
    for i in range(0, len(pool.images), batch):
        d = vae.encode(to_float(pool.images[i : i + batch])).latent_dist
        means.append(d.mean)
        stds.append(d.std)
    s = vae.config.scaling_factor
    return torch.cat(means) * s, torch.cat(stds) * s


# ----------------------------------------------------------------------------- UNet


def _layer_maps(store) -> dict:
    """layer -> recorded probabilities, from a RawAttention store or a {"maps": {...}} dict."""
    return store.get("maps", {}) if isinstance(store, dict) else store.maps


def grounding_loss(
    store,
    pos: torch.Tensor,
    valid: torch.Tensor,
    m16: torch.Tensor,
    m8: torch.Tensor,
    cover: float = 0.0,
) -> torch.Tensor:
    """Mean over layers and grounded words of a word's attention-vs-mask mismatch.

    Per word (map = mean over heads of its cross-attention column): 1 - mass inside its
    object's mask / total mass, plus `cover` * (1 - cosine(map, mask)). The first term
    alone is met by a map that is one hot pixel inside the object; the cosine term asks
    the map to spread over the whole object, as large models' word maps do.
    store: a `model.RawAttention` (or {"maps": {layer: [probs]}}), probabilities (B*heads, HW, L);
    pos: (B,3,2) token positions; valid: (B,3) bool object slots to ground; m16/m8: (B,3,h,w).
    """
    b = pos.shape[0]
    if not bool(valid.any()):
        return torch.zeros(())
    idx = pos.reshape(b, 1, MAX_OBJ * 2)
    w = valid[:, :, None].expand(-1, -1, 2).reshape(b, 6).float()
    losses = []
    for maps in _layer_maps(store).values():
        for probs in maps:
            hw = probs.shape[1]
            p = probs.reshape(b, -1, hw, probs.shape[-1]).mean(1)  # B,HW,L
            cols = p.gather(2, idx.expand(b, hw, -1)).transpose(1, 2)  # B,6,HW
            m = m16 if hw == m16[0, 0].numel() else m8
            masks = m.reshape(b, MAX_OBJ, 1, -1).expand(-1, -1, 2, -1).reshape(b, 6, -1)
            inside = (cols * masks).sum(-1)
            per_word = 1 - inside / (cols.sum(-1) + 1e-8)
            if cover > 0:
                cos = inside / (cols.norm(dim=-1) * masks.norm(dim=-1) + 1e-8)
                per_word = per_word + cover * (1 - cos)
            losses.append((per_word * w).sum() / w.sum())
    return torch.stack(losses).mean()


def lr_at(cfg: Config, step: int) -> float:
    if step < cfg.warmup:
        return cfg.lr * (step + 1) / cfg.warmup
    frac = (step - cfg.warmup) / max(1, cfg.steps - cfg.warmup)
    return cfg.lr * (cfg.min_lr_frac + (1 - cfg.min_lr_frac) * 0.5 * (1 + math.cos(math.pi * frac)))


def sample_indices(cfg: Config, pool: Pool, step: int, rng: np.random.Generator) -> np.ndarray:
    """Batch indices: mostly single-object scenes during the curriculum, then a mix."""
    probs = (0.7, 0.25, 0.05) if step < cfg.curriculum_steps else (0.25, 0.45, 0.30)
    kinds = rng.choice(3, size=cfg.batch, p=probs)
    starts = np.cumsum((0,) + tuple(cfg.n_pool))
    return np.array([starts[k] + rng.integers(cfg.n_pool[k]) for k in kinds])


def load_init(src: Path, tokenizer) -> tuple[M.UNet2DConditionModel, M.CLIPTextModel, M.AutoencoderKL]:
    """UNet, text encoder and VAE of an exported model folder (its UNet/text are the EMA)."""
    from transformers import CLIPTokenizer

    if CLIPTokenizer.from_pretrained(str(src / "tokenizer")).get_vocab() != tokenizer.get_vocab():
        raise SystemExit(f"{src}: its tokenizer differs from build_tokenizer(); cannot continue its training")
    unet = M.UNet2DConditionModel.from_pretrained(str(src / "unet"))
    text = M.CLIPTextModel.from_pretrained(str(src / "text_encoder"))
    vae = M.AutoencoderKL.from_pretrained(str(src / "vae"))
    return unet, text, vae


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    defaults = Config()
    for name, val in asdict(defaults).items():
        if isinstance(val, tuple):
            ap.add_argument(f"--{name.replace('_', '-')}", type=int, nargs=len(val), default=list(val))
        else:
            ap.add_argument(f"--{name.replace('_', '-')}", type=type(val), default=val)
    ap.add_argument(
        "--stop-after", type=int, default=0, help="stop after this many steps in this invocation (resume tests)"
    )
    args = ap.parse_args(argv)
    stop_after = args.__dict__.pop("stop_after")
    cfg = Config(**{k: tuple(v) if isinstance(v, list) else v for k, v in vars(args).items()})
    torch.set_num_threads(cfg.threads)
    ckpt, out = Path(cfg.ckpt), Path(cfg.out)
    ckpt.mkdir(parents=True, exist_ok=True)
    log_path = ckpt / "train_log.jsonl"
    revision = git_revision()

    def log(rec: dict) -> None:
        rec = {"time": round(time.time(), 1), **rec}
        with open(log_path, "a") as f:
            f.write(json.dumps(rec) + "\n")

    if (ckpt / "weights.safetensors").exists() and not list_checkpoints(ckpt):
        raise SystemExit(f"{ckpt} holds a checkpoint in the old single-file layout; start a new --ckpt folder")
    latest = load_latest(ckpt)
    resumed = latest is not None
    if resumed:
        saved = latest[1]
        if saved["config"] != config_json(cfg):
            diff = {k: (saved["config"].get(k), v) for k, v in config_json(cfg).items() if saved["config"].get(k) != v}
            print(f"warning: resuming with a changed config: {diff}")
    tokenizer = build_tokenizer()
    t0 = time.time()
    pool = build_pool(cfg, tokenizer)
    log({"stage": "pool", "n": len(pool.images), "seconds": round(time.time() - t0, 1)})

    torch.manual_seed(cfg.seed)
    init = load_init(Path(cfg.init_from), tokenizer) if cfg.init_from else None
    vae_path = ckpt / "vae"
    if (vae_path / "config.json").exists():
        vae = M.AutoencoderKL.from_pretrained(str(vae_path))
    else:
        vae = init[2] if init else train_vae(cfg, pool, log)
        vae.save_pretrained(str(vae_path.with_name("vae.tmp")), safe_serialization=True)
        if vae_path.exists():
            shutil.rmtree(vae_path)
        os.replace(vae_path.with_name("vae.tmp"), vae_path)
    vae.eval().requires_grad_(False)
    lat_mean, lat_std = encode_pool(vae, pool)
    log({"stage": "encoded", "seconds": round(time.time() - t0, 1)})

    torch.manual_seed(cfg.seed)
    unet = M.build_unet()
    text = M.build_text_encoder(tokenizer)
    if init:
        unet.load_state_dict(init[0].state_dict())
        text.load_state_dict(init[1].state_dict())
        log({"stage": "init", "from": cfg.init_from})
    ema_unet, ema_text = copy.deepcopy(unet).requires_grad_(False), copy.deepcopy(text).requires_grad_(False)
    store = M.RawAttention()
    M.install_raw_capture(unet, store)
    modules = {"unet.": unet, "text.": text, "ema_unet.": ema_unet, "ema_text.": ema_text}
    params = list(unet.parameters()) + list(text.parameters())
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=0.01)
    sched = M.build_train_scheduler()
    alphas = sched.alphas_cumprod
    snr = alphas / (1 - alphas)
    start = 0
    avg: dict[str, float] = {}
    if resumed:
        tensors, saved = latest
        load_state_tensors(tensors, saved["optimizer"], modules, opt)
        start, avg = saved["step"], dict(saved.get("avg", {}))
        print(f"resumed from step {start}")
    empty_ids = tokenizer(
        [""], padding="max_length", max_length=tokenizer.model_max_length, return_tensors="pt"
    ).input_ids[0]

    def checkpoint(step: int) -> None:
        tensors, opt_meta = state_tensors(modules, opt)
        meta = {"config": config_json(cfg), "optimizer": opt_meta, "avg": avg, "git_revision": revision}
        save_checkpoint(ckpt, step, tensors, meta, keep=cfg.ckpt_keep)

    unet.train()
    text.train()
    bar = tqdm(range(start, cfg.steps), initial=start, total=cfg.steps, desc="unet", mininterval=20)
    for step in bar:
        rng = np.random.default_rng([cfg.seed, step])
        g = torch.Generator().manual_seed(int(rng.integers(2**62)))
        idx = torch.from_numpy(sample_indices(cfg, pool, step, rng))
        b = len(idx)
        eps_post = torch.randn(lat_mean[idx].shape, generator=g)
        z0 = lat_mean[idx] + lat_std[idx] * eps_post
        noise = torch.randn(z0.shape, generator=g)
        t = torch.randint(0, sched.config.num_train_timesteps, (b,), generator=g)
        zt = sched.add_noise(z0, noise, t)
        drop = torch.rand(b, generator=g) < cfg.p_empty
        ids = pool.ids[idx].clone()
        partial = torch.zeros(b, dtype=torch.bool)
        if cfg.p_partial > 0:
            partial = ~drop & torch.from_numpy(rng.random(b) < cfg.p_partial)
            rows = partial.nonzero()[:, 0].tolist()
            if rows:
                texts = [partial_caption(pool.objects[int(idx[r])], rng) for r in rows]
                ids[rows] = tokenizer(texts, padding="max_length", max_length=tokenizer.model_max_length,
                                      truncation=True, return_tensors="pt").input_ids
        ids[drop] = empty_ids
        n_obj = pool.n_obj[idx]
        grounded = ~(drop | partial) & (t < cfg.ground_tmax)
        valid = (torch.arange(MAX_OBJ)[None] < n_obj[:, None]) & grounded[:, None]
        if cfg.ground_scope == "multi":
            valid &= (n_obj >= 2)[:, None]
        use_ground = cfg.ground_lambda > 0 and step >= cfg.ground_start and bool(valid.any())
        for group in opt.param_groups:
            group["lr"] = lr_at(cfg, step)

        store.clear()
        store.enabled = use_ground
        cond = text(ids)[0]
        pred = unet(zt, t, encoder_hidden_states=cond).sample
        store.enabled = False
        weight = torch.clamp(snr[t], max=cfg.snr_gamma) / snr[t]
        mse = ((pred - noise) ** 2).mean(dim=(1, 2, 3))
        loss_noise = (mse * weight).mean()
        loss = loss_noise
        loss_g = torch.zeros(())
        if use_ground:
            cover = cfg.ground_cover if step >= cfg.ground_cover_start else 0.0
            loss_g = grounding_loss(store, word_positions(n_obj), valid, pool.masks16[idx], pool.masks8[idx], cover)
            loss = loss + cfg.ground_lambda * loss_g
        store.clear()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        decay = min(cfg.ema, (1 + step) / (10 + step))
        with torch.no_grad():
            for src, dst in ((unet, ema_unet), (text, ema_text)):
                for p_ema, p in zip(dst.parameters(), src.parameters(), strict=True):
                    p_ema.lerp_(p, 1 - decay)
        for k, v in (("loss", loss_noise.item()), ("ground", loss_g.item())):
            avg[k] = v if k not in avg else 0.95 * avg[k] + 0.05 * v
        bar.set_postfix(loss=f"{avg['loss']:.4f}", ground=f"{avg['ground']:.3f}", refresh=False)
        done = step + 1
        stopping = bool(stop_after) and done - start >= stop_after and done < cfg.steps
        if done % cfg.log_every == 0:
            log(
                {
                    "stage": "unet",
                    "step": done,
                    "loss": avg["loss"],
                    "ground": avg["ground"],
                    "lr": lr_at(cfg, step),
                }
            )
        if done % cfg.ckpt_every == 0 or done == cfg.steps or stopping:
            checkpoint(done)
        if done % cfg.export_every == 0 or done == cfg.steps:
            info = {"step": done, "seed": cfg.seed, "init_from": cfg.init_from or None,
                    "git_revision": revision, "config": config_json(cfg)}
            hints_from = (Path(cfg.init_from),) if cfg.init_from else ()
            export_pipeline(out, vae, ema_text, ema_unet, tokenizer, info, hints_from)
            log({"stage": "export", "step": done})
        if stopping:
            log({"stage": "stopped", "step": done})
            return
    log({"stage": "done", "step": cfg.steps})


if __name__ == "__main__":
    main()
