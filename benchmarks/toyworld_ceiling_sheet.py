"""A contact sheet of the toy model's own words on held-out pairs, each image titled with the checker's verdict.

    python benchmarks/toyworld_ceiling_sheet.py      # ~1 min, 1 thread -> results/toyworld_ceiling_sheet_0.png

To look at what the ceiling (`python -m mcpl.toyworld.ceiling`) counts: 32 "a yellow square" (the pair the
first pretraining run could not draw), 16 "a green cross", 16 "a blue circle"; DDIM 20, CFG 5, seeds 80 000+
(a range neither the ceiling nor the gates use). Drawn by the labelled set's own sheet writer.
"""

from __future__ import annotations

import os
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch  # noqa: E402

from mcpl.method.model_files import TOY_MODEL  # noqa: E402
from mcpl.toyworld import checker as C  # noqa: E402
from mcpl.toyworld.gates import ToyModel  # noqa: E402
from mcpl.toyworld.labelset import write_sheets  # noqa: E402

RESULTS = Path(__file__).parent / "results"


def main() -> None:
    torch.set_num_threads(1)
    model, checker = ToyModel(str(TOY_MODEL)), C.Checker.load(C.DEFAULT_DIR)
    prompts = ["a yellow square"] * 32 + ["a green cross"] * 16 + ["a blue circle"] * 16
    images, _ = model.sample(prompts, [80_000 + i for i in range(len(prompts))], 20, 5.0)
    titles = [f"{k}: " + (" + ".join(f"{o.colour} {o.shape}" for o in checker.read(image)) or "nothing")
              for k, image in enumerate(images)]
    for path in write_sheets(images, RESULTS, titles, stem="toyworld_ceiling_sheet", scale=4):
        print(path)


if __name__ == "__main__":
    main()
