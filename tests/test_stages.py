"""SegICL stage 1 and stage 2 task modules through the shared loop, on the shipped demo sample."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch

from segicl import PACKAGE_DIR
from segicl.data import find_datasets, load_dataset
from segicl.data.transforms import mask_to_tensor, resize_prob
from segicl.pipeline import SegICLPipeline
from training.common import batch_dice, val_items

DEMO = PACKAGE_DIR / "assets" / "demo"


def _quick(out_dir, steps: int = 2, batch_size: int = 2) -> dict:
    """A few-step loop config for the stage tests (no progress bar, no tensorboard, no validation)."""
    return {"max_steps": steps, "batch_size": batch_size, "lr": 1e-3, "warmup_steps": 1, "log_every": 1,
            "val_every": -1, "out_dir": str(out_dir), "seed": 0, "progress": False, "tensorboard": False}


def test_batch_dice_cases():
    p = torch.zeros(3, 4, 4)
    t = torch.zeros(3, 4, 4)
    p[0, :2] = 1
    t[0, :2] = 1  # perfect
    p[1, 0, 0] = 1  # predicted 1 pixel, target empty
    # item 2: both empty -> 1
    assert batch_dice(p, t) == [1.0, 0.0, 1.0]


def test_val_items_are_fixed_and_supports_come_from_train():
    datasets = [load_dataset(f) for f in find_datasets(DEMO)]
    a = val_items(datasets, per_task=2, seed=0, image_size=64, mask_size=64, split="test", k=3)
    b = val_items(datasets, per_task=2, seed=0, image_size=64, mask_size=64, split="test", k=3)
    assert len(a) == 2 * len(datasets)
    assert all(len(x["support_images"]) == 3 and x["mask"].sum() > 0 for x in a)
    assert all(torch.equal(x["image"], y["image"]) and torch.equal(x["support_masks"][0], y["support_masks"][0])
               for x, y in zip(a, b))


@pytest.fixture(scope="module")
def stage1_model(tmp_path_factory):
    from training.loop import train
    from training.stage1 import build_stage1_task

    out = tmp_path_factory.mktemp("s1")
    cfg = {"model": {"preset": "tiny"}, "data": {},
           "train": _quick(out, 3, 4)}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        task, ds, val = build_stage1_task(cfg, [DEMO])
    assert val is None  # the demo sample has no val split
    before = {k: v.clone() for k, v in task.pipe.encoder.state_dict().items()}
    item = ds[0]
    assert item["image"].shape == (3, 64, 64) and item["mask"].shape == (1, 64, 64)
    res = train(task, ds, None, cfg["train"])
    # stage 1 leaves the multimodal encoder untouched
    assert all(torch.equal(before[k], v) for k, v in task.pipe.encoder.state_dict().items())
    return res["model_dir"]


def test_stage1_trains_decoder_and_saves_pipeline(stage1_model):
    pipe = SegICLPipeline.from_pretrained(stage1_model)
    fresh = SegICLPipeline.from_preset("tiny", seed=0)
    moved = [k for k, v in pipe.decoder.state_dict().items() if not torch.equal(v, fresh.decoder.state_dict()[k])]
    assert moved, "stage 1 did not update the decoder"


def test_stage2_trains_only_the_encoder(stage1_model, tmp_path):
    from training.loop import train
    from training.stage1 import make_val_fn as stage1_val
    from training.stage2 import build_stage2_task, make_val_fn

    cfg = {"model": {"init": str(stage1_model)}, "data": {"k_max": 3},
           "train": _quick(tmp_path, 2, 4)}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        task, ds, _ = build_stage2_task(cfg, [DEMO])
    ep = ds[0]
    assert ep["support_images"].shape == (3, 3, 64, 64) and 0 <= ep["num_supports"] <= 3
    frozen = {k: v.clone() for k, v in task.pipe.decoder.state_dict().items()}
    enc_before = {k: v.clone() for k, v in task.encoder.state_dict().items()}
    assert not any(p.requires_grad for p in task.pipe.condition_encoder.parameters())
    out = task(ds.collate_fn([ds[i] for i in range(4)]))
    assert out["loss"].requires_grad and torch.isfinite(out["loss"])
    res = train(task, ds, None, cfg["train"])
    assert all(torch.equal(frozen[k], v) for k, v in task.pipe.decoder.state_dict().items())
    assert any(not torch.equal(enc_before[k], v) for k, v in task.encoder.state_dict().items())
    # validation at k = 0 and k = 3 on the demo's test split (a real metric on decoded S)
    datasets = [load_dataset(f) for f in find_datasets(DEMO)]
    items = {k: val_items(datasets, 1, 0, 64, 64, split="test", k=k) for k in (0, 3)}
    metrics = make_val_fn(items, steps=2)(task)
    assert {"dice_k0", "dice_k3", "mse_k0", "mse_k3", "dice"} <= metrics.keys()
    assert all(0 <= metrics[k] <= 1 for k in ("dice_k0", "dice_k3")) and metrics["mse_k0"] > 0
    s1 = stage1_val(items[0], steps=2)(task)
    assert "dice_null" in s1 and any(k.startswith("dice/") for k in s1)
    assert SegICLPipeline.from_pretrained(res["model_dir"]).num_parameters() == task.pipe.num_parameters()


def test_stage3_trains_only_the_decoder_on_predicted_tokens(stage1_model, tmp_path):
    from training.loop import train
    from training.stage3 import build_stage3_task

    cfg = {"model": {"init": str(stage1_model)}, "data": {"k_max": 2, "true_c_prob": 0.5},
           "train": _quick(tmp_path, 2, 2)}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        task, ds, _ = build_stage3_task(cfg, [DEMO])
    enc = {k: v.clone() for k, v in task.pipe.encoder.state_dict().items()}
    dec = {k: v.clone() for k, v in task.pipe.decoder.state_dict().items()}
    train(task, ds, None, cfg["train"])
    assert all(torch.equal(enc[k], v) for k, v in task.pipe.encoder.state_dict().items())
    assert any(not torch.equal(dec[k], v) for k, v in task.pipe.decoder.state_dict().items())


def test_stage3_route_conditions_items_with_supports_on_the_matched_mask(stage1_model, tmp_path):
    from training.episodes import collate
    from training.stage3 import build_stage3_task

    cfg = {"model": {"init": str(stage1_model), "matching": {"mode": "route"}},
           "data": {"k_max": 2, "k_dist": [0.5, 0.0, 0.5], "route_prob": 1.0},
           "train": {"max_steps": 1, "seed": 0}}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        task, ds, _ = build_stage3_task(cfg, [DEMO])
    assert task.pipe.config.matching.mode == "route"  # saved with the checkpoint
    batch = collate([ds[i] for i in range(8)])
    ks = [int(k) for k in batch["num_supports"]]
    assert 0 in ks and 2 in ks
    seen = {}
    task.decoder.loss = lambda q, qm, s, *a, **kw: seen.setdefault("s", s)
    task(batch)
    with torch.no_grad():
        prior = task.pipe.match(batch["query_image"], batch["support_images"], batch["support_masks"], ks)
        routed = task.pipe.condition_encoder((prior > 0.5).float())
        lm = task.pipe.encoder(list(batch["text"]), batch["query_image"])
    for i, k in enumerate(ks):
        assert torch.allclose(seen["s"][i], routed[i] if k else lm[i], atol=1e-5), (i, k)


def test_stage3_keeps_the_incoming_decoder_as_route_decoder(stage1_model, tmp_path):
    from training.loop import train
    from training.stage3 import build_stage3_task

    cfg = {"model": {"init": str(stage1_model), "matching": {"mode": "route"}, "route_decoder": True},
           "data": {"k_max": 2},
           "train": _quick(tmp_path, 2, 2)}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        task, ds, _ = build_stage3_task(cfg, [DEMO])
    before = {k: v.clone() for k, v in task.pipe.decoder.state_dict().items()}
    assert not {id(p) for p in task.pipe.route_decoder.parameters()} & {id(p) for p in task.parameters()}
    res = train(task, ds, None, cfg["train"])
    route = task.pipe.route_decoder.state_dict()
    assert all(torch.equal(before[k], v) for k, v in route.items())  # the stage-1 decoder, untouched
    assert any(not torch.equal(before[k], v) for k, v in task.pipe.decoder.state_dict().items())

    pipe = SegICLPipeline.from_pretrained(res["model_dir"]).set_fine(mode="none")  # the decoders' own output
    assert pipe.route_decoder is not None and "route_decoder" in pipe.num_parameters()
    assert all(torch.equal(route[k], v) for k, v in pipe.route_decoder.state_dict().items())
    # items with supports are rendered by the route decoder, items without by the adapted decoder
    ds_ = load_dataset(find_datasets(DEMO)[0])
    (t,) = ds_.tasks()
    q, s1 = (ds_.sample(s, t.label_value) for s in ds_.stems("train")[:2])
    x = pipe._images_tensor([q.image], "q")
    s_pair = (pipe._images_tensor([s1.image], "s")[0], mask_to_tensor(s1.mask, pipe.config.mask_size))
    for sup, sup_t, dec in (([(s1.image, s1.mask)], [[s_pair]], pipe.route_decoder), ([], [[]], pipe.decoder)):
        out = pipe([q.image], supports=[sup], num_inference_steps=2, generator=torch.Generator().manual_seed(0))
        cond = pipe.encode(x, [""], sup_t)
        ref = dec.sample(x, cond, pipe.scheduler, 2, 1, "ddim", torch.Generator().manual_seed(0))[0, 0]
        assert np.allclose(out.probabilities[0], resize_prob(ref.numpy(), q.mask.shape), atol=1e-5)


@pytest.mark.parametrize("stage", ["stage1", "stage2", "stage3"])
def test_stage_tasks_move_their_frozen_parts_along(stage, stage1_model):
    # accelerate's prepare moves the task with .to(device); the frozen teachers live outside the module
    # tree (kept from the optimizer), so the task must carry them and pipe.device along ("meta" stands
    # in for a GPU here: the same _apply path as .to("cuda")).
    import importlib

    build = getattr(importlib.import_module(f"training.{stage}"), f"build_{stage}_task")
    model = {"preset": "tiny"} if stage == "stage1" else {"init": str(stage1_model)}
    cfg = {"model": model, "data": {"k_max": 2}, "train": {"max_steps": 1, "seed": 0}}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        task = build(cfg, [DEMO])[0]
    task.to("meta")
    assert task.pipe.device.type == "meta"
    for name, module in task.pipe.modules().items():
        assert all(p.device.type == "meta" for p in module.parameters()), name
    if stage != "stage1":  # the frozen parts are still not among the task's (optimizer's) parameters
        frozen = task.pipe.condition_encoder
        assert not {id(p) for p in frozen.parameters()} & {id(p) for p in task.parameters()}


def test_stage2_lora_trains_adapters_and_saves_merged_weights(tmp_path):
    """Paper-preset path: peft LoRA on the LM, projectors trainable, vision frozen; saved merged."""
    from training.stage2 import Stage2Task, apply_lora

    pipe = SegICLPipeline.from_preset("tiny", seed=0)
    apply_lora(pipe, {"r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "v_proj"]})
    task = Stage2Task(pipe, {"lr": 1e-3})
    names = {n for n, p in task.named_parameters() if p.requires_grad}
    assert any("lora_A" in n for n in names) and any(n.startswith("encoder.image_proj") for n in names)
    assert not any(n.startswith("encoder.vision.") for n in names)
    assert not any("lm." in n and "lora" not in n for n in names)  # base LM weights frozen
    q = torch.rand(2, 3, 64, 64) * 2 - 1
    s = pipe.encoder(["a", "b"], q)
    assert s.shape == (2, pipe.config.num_condition_tokens, pipe.config.condition.dim)
    task.save_pretrained(tmp_path / "ck")
    loaded = SegICLPipeline.from_pretrained(tmp_path / "ck")  # plain Qwen2 architecture again
    with torch.no_grad():
        assert torch.allclose(loaded.encoder(["a", "b"], q), pipe.encoder(["a", "b"], q), atol=1e-4)


def test_stage2_dense_matcher_trains_on_real_and_pseudo_tasks(stage1_model, tmp_path):
    """Issue 16: the dense layout trains with the mask-head loss (propagation teacher first) on episodes
    mixed with pseudo-tasks, validates its mask head, and records the distinct tasks it saw."""
    import json

    from training.loop import train
    from training.pseudo_tasks import MixedEpisodes
    from training.stage2 import build_stage2_task, make_val_fn

    cfg = {"model": {"init": str(stage1_model), "encoder": {"lm": {"support_tokens": "dense", "support_prior": "propagation"}}},
           "data": {"k_max": 3, "pseudo_prob": 0.5}, "train": {**_quick(tmp_path, 3, 4), "teacher_steps": 1}}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        task, ds, _ = build_stage2_task(cfg, [DEMO])
    assert isinstance(ds, MixedEpisodes)
    names = {ds[i]["dataset"] for i in range(16)}
    assert any(n.startswith("pseudo:") for n in names) and any(not n.startswith("pseudo:") for n in names)
    out = task(ds.collate_fn([ds[i] for i in range(4)]))
    assert {"loss", "cos", "mask_loss", "head_dice"} <= out.keys() and out["loss"].requires_grad
    assert out["loss"] > out["mask_loss"] > 0  # MSE(S, C) + the mask head's BCE + Dice
    res = train(task, ds, None, cfg["train"])
    from pathlib import Path

    manifest = json.loads((Path(res["model_dir"]) / "manifest.json").read_text())
    seen = manifest["tasks_seen"]
    assert seen["distinct_tasks"] == seen["real_tasks"] + seen["pseudo_tasks"] and seen["distinct_tasks"] >= 1
    datasets = [load_dataset(f) for f in find_datasets(DEMO)]
    items = {k: val_items(datasets, 1, 0, 64, 64, split="test", k=k) for k in (0, 3)}
    metrics = make_val_fn(items, steps=2)(task)
    assert 0 <= metrics["head_dice_k3"] <= 1 and 0 <= metrics["dice_k3"] <= 1
    pipe = SegICLPipeline.from_pretrained(res["model_dir"])
    assert pipe.config.lm.support_tokens == "dense"
