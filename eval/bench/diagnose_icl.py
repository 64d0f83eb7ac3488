"""Where does in-context segmentation fail? Measures each stage of a SegICL pipeline separately.

    python -m eval.bench.diagnose_icl --checkpoint segicl/checkpoints/tiny --data ../shared/data \
        --split val --per-task 12 --out runs/diagnose

Per (dataset, label), on ``--per-task`` queries of ``--split`` with supports from the train split
(another group):

* ``dice_true_c``: the decoder sampling from the *true* condition tokens C = condition_encoder(mask)
  (is the decoder able to render masks at all?);
* ``dice_k0`` / ``dice_k5``: decoding the encoder's S without supports / with k real supports;
* ``dice_k5_wrong``: with k supports of *another* task (does the model use what the supports say?);
* ``cos_s_c_k0`` / ``cos_s_c_k5``: cosine between S and C;
* ``s_shift``: ||S(k) - S(0)|| / ||S(0)|| (does S depend on the supports at all?);
* ``dice_prior_learned`` (models with ``lm.support_prior="attention"``): the label-propagation prior
  alone, upsampled and thresholded (do the learned patch correspondences transfer?);
* ``dice_prior_pixels``: the training-free label propagation of :mod:`segicl.matching` (the
  checkpoint's ``matching`` settings: hand-made patch features, class-balanced top-k votes) alone;
* ``dice_route``: the decoder rendering that propagated mask (``matching.mode = "route"``: the
  condition encoder's tokens of the thresholded prior, rendered by the route decoder where the
  checkpoint has one); does the decoder keep, lose or sharpen it?

Writes diagnose.csv and diagnose.md in ``--out`` and prints the table.
"""

from __future__ import annotations

import argparse
import csv
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from segicl.pipeline import SegICLPipeline, default_checkpoint
from training.common import batch_dice, val_items
from training.vlsm_task import resolve_datasets


def prior_dice(prior: torch.Tensor, masks: torch.Tensor) -> float:
    """Dice of a (b, 1, g, g) prior upsampled (bilinear) to the masks and thresholded at 0.5."""
    up = F.interpolate(prior, size=masks.shape[-2:], mode="bilinear", align_corners=False)[:, 0]
    return float(np.mean(batch_dice(up, masks[:, 0])))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m eval.bench.diagnose_icl", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", default=None)
    p.add_argument("--data", type=Path, nargs="+", default=[Path("../shared/data")])
    p.add_argument("--split", default="val")
    p.add_argument("--per-task", type=int, default=12)
    p.add_argument("--k", type=int, default=5)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, required=True)
    a = p.parse_args(argv)
    torch.manual_seed(a.seed)
    pipe = SegICLPipeline.from_pretrained(a.checkpoint or default_checkpoint())
    datasets = resolve_datasets(a.data)
    cfg = pipe.config
    items = val_items(datasets, a.per_task, a.seed, cfg.image_size, cfg.mask_size, split=a.split, k=a.k)
    tasks = sorted({it["task"] for it in items})
    rows = []
    for t_i, task in enumerate(tasks):
        chunk = [it for it in items if it["task"] == task]
        other = [it for it in items if it["task"] == tasks[(t_i + 1) % len(tasks)]]  # another task's supports
        img = torch.stack([c["image"] for c in chunk])
        msk = torch.stack([c["mask"] for c in chunk])
        texts = [c["text"] for c in chunk]
        sup = [list(zip(c["support_images"], c["support_masks"])) for c in chunk]
        wrong = [list(zip(other[i % len(other)]["support_images"], other[i % len(other)]["support_masks"]))
                 for i in range(len(chunk))]
        with torch.no_grad():
            c = pipe.condition_encoder(msk)
            s0 = pipe.encode(img, texts, [[] for _ in chunk])
            sk = pipe.encode(img, texts, sup)
            sw = pipe.encode(img, texts, wrong)

            def dec(cond, img=img, msk=msk, decoder=pipe.decoder, k=0):
                g = torch.Generator().manual_seed(a.seed)
                if k:  # what the pipeline does with supports (the route decoder under the route, if any)
                    prob = pipe.decode(img, cond, [k] * len(img), a.steps, 1, None, g)[:, 0]
                else:
                    prob = decoder.sample(img, cond, pipe.scheduler, a.steps, 1, cfg.scheduler.sampler, g)[:, 0]
                return float(np.mean(batch_dice(prob, msk[:, 0])))

            row = {
                "task": task, "n": len(chunk),
                "dice_true_c": dec(c), "dice_k0": dec(s0), f"dice_k{a.k}": dec(sk, k=a.k), f"dice_k{a.k}_wrong": dec(sw, k=a.k),
                "cos_s_c_k0": F.cosine_similarity(s0, c, dim=-1).mean().item(),
                f"cos_s_c_k{a.k}": F.cosine_similarity(sk, c, dim=-1).mean().item(),
                "s_shift": ((sk - s0).norm() / s0.norm()).item(),
            }
            # label propagation alone (no LM, no decoder): the model's learned prior where it has one,
            # and the same propagation over hand-made pixel keys (a training-free reference)
            simg = torch.stack([torch.stack(list(c["support_images"])) for c in chunk])
            smsk = torch.stack([torch.stack(list(c["support_masks"])) for c in chunk])
            kk = [simg.shape[1]] * len(chunk)
            enc = pipe.encoder
            if hasattr(enc, "prior_key"):
                grid_q, grid_s = enc.vision_grid(img), enc.vision_grid(simg.flatten(0, 1))
                row["dice_prior_learned"] = prior_dice(enc.support_prior(grid_q, grid_s, smsk, kk), msk)
            matched = pipe.match(img, simg, smsk, kk)
            row["dice_prior_pixels"] = prior_dice(matched, msk)
            if cfg.matching.mode == "route":  # the k-support tokens above are already the route's
                row["dice_route"] = row[f"dice_k{a.k}"]
            else:
                row["dice_route"] = dec(pipe.route_condition(matched), decoder=pipe.route_decoder or pipe.decoder)
        rows.append(row)
        print({k: (round(v, 3) if isinstance(v, float) else v) for k, v in row.items()}, flush=True)
    mean = {"task": "mean", "n": sum(r["n"] for r in rows)}
    for key in rows[0]:
        if key not in ("task", "n"):
            mean[key] = float(np.mean([r[key] for r in rows]))
    rows.append(mean)
    a.out.mkdir(parents=True, exist_ok=True)
    with open(a.out / "diagnose.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    keys = list(rows[0])
    lines = ["| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
    lines += ["| " + " | ".join(f"{r[k]:.3f}" if isinstance(r[k], float) else str(r[k]) for k in keys) + " |" for r in rows]
    (a.out / "diagnose.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
