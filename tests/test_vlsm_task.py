"""training.vlsm_task: the VLSM task trains through a plain loop on real data and saves a model the
eval suite loads."""

from __future__ import annotations

import pytest
import torch
from torch.utils.data import DataLoader

from segicl.vlsm import load_vlsm
from segicl.vlsm.registry import load_config
from tests.conftest import REPO
from training.vlsm_task import EarlyStopping, build_vlsm_task, resolve_datasets


def config(model: str, mode: str, **data) -> dict:
    cfg = load_config(REPO / "configs" / "vlsm" / f"{model}_tiny.yaml")
    cfg["mode"] = mode
    cfg["data"].update({"datasets": ["kvasir_seg"], "max_train_samples": 8, "max_val_samples": 4, **data})
    cfg["train"]["batch_size"] = 4
    return cfg


@pytest.mark.parametrize("model, mode", [("clipseg", "vpt"), ("cris", "decoder")])
def test_task_trains_validates_and_saves(model, mode, shared_data, tmp_path):
    torch.manual_seed(0)
    task, train_set, val_fn = build_vlsm_task(config(model, mode, prompt_levels=["p1", "p6"]), [shared_data])
    assert len(train_set) == 8
    item = train_set[0]
    assert item["pixel_values"].shape == (3, 64, 64) and item["mask"].shape == (1, 64, 64)
    assert item["input_ids"].shape == item["attention_mask"].shape == (task.model.text_length,)
    opt, plateau = task.configure_optimizers()
    assert opt.param_groups[0]["lr"] == task.train_config["lr"]
    stopper = task.early_stopping()
    loader = DataLoader(train_set, batch_size=4, shuffle=False)
    fixed = next(iter(loader))
    first = task(fixed)["loss"].item()
    task.train()
    for epoch in range(2):
        train_set.set_epoch(epoch)
        for batch in loader:
            out = task(batch)
            opt.zero_grad()
            out["loss"].backward()
            opt.step()
        metrics = val_fn(task)
        plateau.step(metrics["dice"])
        stopper.step(metrics["dice"])
    assert task(fixed)["loss"].item() < first
    assert 0.0 <= metrics["dice"] <= 1.0 and "dice/kvasir_seg/polyp" in metrics and metrics["loss"] > 0
    task.save_pretrained(tmp_path / "model")
    loaded = load_vlsm(tmp_path / "model")
    assert loaded.mode == mode
    assert val_fn(loaded)["dice"] == pytest.approx(val_fn(task)["dice"])
    sample_image = train_set.items[0][0].sample(train_set.items[0][1], 255).image
    prob = loaded.predict([sample_image], ["polyp"])[0]
    assert prob.shape == (sample_image.height, sample_image.width)


def test_prompts_change_with_epoch_and_stay_deterministic(shared_data):
    cfg = config("clipseg", "coop", prompt_levels=["p7", "p8", "p9"])
    _, a, _ = build_vlsm_task(cfg, [shared_data])
    _, b, _ = build_vlsm_task(cfg, [shared_data])
    assert torch.equal(a[0]["input_ids"], b[0]["input_ids"])
    ids = set()
    for epoch in range(5):
        a.set_epoch(epoch)
        ids.add(tuple(a[0]["input_ids"].tolist()))
    assert len(ids) > 1


def test_multiclass_tasks_and_leave_one_out(shared_data):
    cfg = config("clipseg", "decoder", datasets=None, max_train_samples=2)
    keep = ["wbc_blood_smear"]
    exclude = [p.name for p in sorted(shared_data.iterdir()) if (p / "dataset.json").is_file() and p.name not in keep]
    _, train_set, _ = build_vlsm_task(cfg, [shared_data], exclude)
    assert {(ds.name, v) for ds, _, v in train_set.items} == {("wbc_blood_smear", 128), ("wbc_blood_smear", 255)}
    with pytest.raises(ValueError, match="unknown dataset"):
        resolve_datasets([shared_data], ["no_such_set"])
    # a dataset folder works as well as a root
    assert [ds.name for ds in resolve_datasets([shared_data / "hc18_fetal_head_us"])] == ["hc18_fetal_head_us"]


def test_zero_shot_and_missing_mode_raise(shared_data):
    with pytest.raises(ValueError, match="nothing to train"):
        build_vlsm_task(config("clipseg", "zero_shot"), [shared_data])
    cfg = config("clipseg", "e2e")
    del cfg["mode"]
    with pytest.raises(ValueError, match="'mode'"):
        build_vlsm_task(cfg, [shared_data])


def test_early_stopping():
    es = EarlyStopping(patience=2)
    assert [es.step(v) for v in (0.5, 0.6, 0.6, 0.55)] == [False, False, False, True]
    assert es.best == 0.6
