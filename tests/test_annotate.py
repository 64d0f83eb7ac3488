"""``segicl annotate``: the JSON API against an in-process server on port 0 (stand-in segmenter, see
tests/annotate_helpers.py), persistence and resume, a SIGKILL during accepts, export round trips."""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from segicl.annotate.app import main
from segicl.annotate.state import Session, SessionError, mask_png, read_mask
from segicl.io import atomic_write_bytes
from tests.annotate_helpers import SIZE, decode_mask, get, post, serve, write_images

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def images(tmp_path: Path) -> tuple[Path, list[str]]:
    folder = tmp_path / "images"
    return folder, write_images(folder)


def test_serves_on_localhost_only_and_refuses_foreign_requests(images, tmp_path):
    folder, _ = images
    with serve(folder, tmp_path / "out") as (url, app):
        assert url.startswith("http://127.0.0.1:")
        port = int(url.rstrip("/").rsplit(":", 1)[1])
        assert port > 0
        page = get(url)
        assert b"<canvas" in page and b"http" not in page.replace(b"http-equiv", b"")  # no external asset
        assert b"fetch(" in get(url + "static/app.js")
        with pytest.raises(urllib.error.HTTPError) as e:  # DNS rebinding: another Host
            get(url + "api/state", headers={"Host": f"evil.example:{port}"})
        assert e.value.code == 403
        with pytest.raises(urllib.error.HTTPError) as e:  # a cross-site form post
            post(url + "api/skip", {"image": "img00.png"}, content_type="application/x-www-form-urlencoded")
        assert e.value.code == 415
        with pytest.raises(urllib.error.HTTPError) as e:
            get(url + "static/../state.py")
        assert e.value.code == 404


def test_state_lists_images_and_bad_files(images, tmp_path):
    folder, names = images
    with serve(folder, tmp_path / "out") as (url, _):
        s = get(url + "api/state")
    assert s["images"] == names and s["total"] == 4 and s["n_accepted"] == 0
    assert s["current"] == names[0] and s["order"] == "sequential"
    assert [e["file"] for e in s["errors"]] == ["broken.png"] and "unreadable" in s["errors"][0]["error"]


def test_click_changes_mask_where_placed(images, tmp_path):
    folder, names = images
    with serve(folder, tmp_path / "out") as (url, app):
        r0 = post(url + "api/predict", {"image": names[0], "interactions": {}})
        assert r0["area"] == 0 and not decode_mask(r0["mask"]).any()  # nothing known yet
        r1 = post(url + "api/predict", {"image": names[0], "interactions": {"pos_points": [[20, 40]]}})
        m1 = decode_mask(r1["mask"])
        assert m1.shape == (SIZE, SIZE) and m1[20, 40] and not m1[50, 10] and r1["area"] == m1.sum() > 0
        assert r1["interactions"]["pos_points"] == [[20, 40]]
        r2 = post(url + "api/predict", {"image": names[0],
                                        "interactions": {"pos_points": [[20, 40]], "neg_points": [[20, 40]]}})
        assert not decode_mask(r2["mask"])[20, 40]
        # coordinates are clipped to the image; boxes and scribbles are inputs too
        r3 = post(url + "api/predict", {"image": names[0], "interactions": {
            "boxes": [[60, 60, 50, 50]], "pos_scribbles": [[[5, 5], [5, 900]]]}})
        m3 = decode_mask(r3["mask"])
        assert m3[55, 55] and m3[5, 5] and m3[5, SIZE - 1] and r3["interactions"]["boxes"] == [[50, 50, 60, 60]]
        # the open image's interactions are pending in session.json
        session = json.loads((tmp_path / "out" / "session.json").read_text())
        assert session["current"] == names[0] and session["pending"]["boxes"] == [[50, 50, 60, 60]]
        with pytest.raises(urllib.error.HTTPError) as e:
            post(url + "api/predict", {"image": names[0], "interactions": {"lasso": []}})
        assert e.value.code == 400 and "lasso" in json.loads(e.value.read())["error"]
        with pytest.raises(urllib.error.HTTPError) as e:
            post(url + "api/predict", {"image": "../secret.png", "interactions": {}})
        assert e.value.code == 400


def test_accept_writes_mask_grows_context_and_moves_on(images, tmp_path):
    folder, names = images
    out = tmp_path / "out"
    with serve(folder, out) as (url, app):
        ints = {"pos_points": [[32, 20]]}
        predicted = decode_mask(post(url + "api/predict", {"image": names[0], "interactions": ints})["mask"])
        s = post(url + "api/accept", {"image": names[0], "interactions": ints})
        assert s["saved"] == str(out / "masks" / "img00.png")
        saved = np.asarray(Image.open(out / "masks" / "img00.png"))
        assert saved.shape == (SIZE, SIZE) and saved.dtype == np.uint8 and set(np.unique(saved)) == {0, 255}
        assert np.array_equal(saved > 0, predicted)
        assert app.segmenter.context_keys == [names[0]] and s["context"] == 1
        assert s["accepted"] == [names[0]] and s["n_accepted"] == 1 and s["current"] == names[1]
        # the next image starts from the context (the stand-in returns the context masks' union)
        nxt = post(url + "api/predict", {"image": names[1], "interactions": {}})
        assert np.array_equal(decode_mask(nxt["mask"]), predicted)
        with pytest.raises(urllib.error.HTTPError) as e:  # a double click: the second accept finds names[1] open
            post(url + "api/accept", {"image": names[0], "interactions": ints})
        assert e.value.code == 409 and "not the open image" in json.loads(e.value.read())["error"]
        s = post(url + "api/skip", {"image": names[1]})
        assert s["current"] == names[2] and s["skipped"] == [names[1]]
        s = post(url + "api/goto", {"image": names[0]})  # an accepted image reopens with its interactions
        assert s["current"] == names[0] and s["interactions"]["pos_points"] == [[32, 20]]
        assert post(url + "api/goto", {"image": names[1]})["current"] == names[1]
        for n in names[1:]:
            s = post(url + "api/accept", {"image": n, "interactions": {"pos_points": [[10, 10]]}})
        assert s["current"] is None and s["n_accepted"] == 4 and len(app.segmenter.context_keys) == 4
    session = json.loads((out / "session.json").read_text())
    assert session["accepted"] == names and session["images_dir"] == str(folder.resolve())
    assert session["done"][names[0]]["pos_points"] == [[32, 20]]
    # accepting an accepted image again replaces its mask (and its context entry)
    with serve(folder, out) as (url, app):
        assert app.session.current is None
        post(url + "api/goto", {"image": names[0]})
        post(url + "api/accept", {"image": names[0], "interactions": {"pos_points": [[5, 5]]}})
        assert app.segmenter.context_keys.count(names[0]) == 1
    redone = read_mask(out / "masks" / "img00.png")
    assert redone[5, 5] and not redone[32, 20]


def test_resume_after_restart(images, tmp_path):
    folder, names = images
    out = tmp_path / "out"
    with serve(folder, out, text="the disc") as (url, _):
        post(url + "api/accept", {"image": names[0], "interactions": {"pos_points": [[32, 20]]}})
        post(url + "api/predict", {"image": names[1], "interactions": {"neg_points": [[3, 4]], "boxes": [[1, 2, 30, 40]]}})
    with serve(folder, out) as (url, app):
        s = get(url + "api/state")
        assert s["current"] == names[1] and s["accepted"] == [names[0]] and s["text"] == "the disc"
        assert s["interactions"]["neg_points"] == [[3, 4]] and s["interactions"]["boxes"] == [[1, 2, 30, 40]]
        assert app.segmenter.context_keys == [names[0]]  # accepted masks are back in the context
        assert np.array_equal(app.segmenter.context[names[0]], read_mask(out / "masks" / "img00.png"))


def test_refuses_another_images_folder_and_foreign_masks(images, tmp_path):
    folder, _ = images
    out = tmp_path / "out"
    Session(folder, out)
    other = tmp_path / "other"
    write_images(other, n=2, bad=False)
    with pytest.raises(SessionError, match="another images folder"):
        Session(other, out)
    foreign = tmp_path / "foreign"
    (foreign / "masks").mkdir(parents=True)
    (foreign / "masks" / "x.png").write_bytes(b"")
    with pytest.raises(SessionError, match="unknown session"):
        Session(folder, foreign)
    assert (foreign / "masks" / "x.png").read_bytes() == b""
    with pytest.raises(SessionError, match="no readable PNG or JPEG"):
        Session(tmp_path / "out", tmp_path / "out2")
    with pytest.raises(SessionError, match="did you mean .*images"):  # a dataset folder instead of its images/
        Session(tmp_path, tmp_path / "out3")


def test_mask_without_session_entry_is_recovered(images, tmp_path):
    """A kill between the mask write and the session write: the mask counts as accepted on restart."""
    folder, names = images
    out = tmp_path / "out"
    Session(folder, out)
    atomic_write_bytes(out / "masks" / "img02.png", mask_png(np.ones((SIZE, SIZE), bool)))
    (out / "masks" / ".img03.png.abc.png").write_bytes(b"half")  # a killed atomic write's temp file
    s = Session(folder, out)
    assert s.accepted == [names[2]] and "interrupted accept" in s.notes[0]
    assert not (out / "masks" / ".img03.png.abc.png").exists()
    (out / "masks" / "img02.png").unlink()
    s = Session(folder, out)
    assert s.accepted == [] and "missing" in s.notes[0]


def test_uncertain_order_picks_the_least_certain_image(images, tmp_path):
    folder, names = images
    with serve(folder, tmp_path / "out", order="uncertain") as (url, _):
        s = post(url + "api/accept", {"image": names[0], "interactions": {"pos_points": [[32, 20]]}})
        assert s["order"] == "uncertain" and s["current"] == names[3]  # brightest = most uncertain for the stand-in
        assert "least certain of 3 remaining" in s["proposal"]


KILL_SCRIPT = """
import argparse, sys
sys.path.insert(0, {repo!r})
from segicl.annotate.app import add_arguments, main
from tests.annotate_helpers import stub_backend
sys.exit(main(add_arguments(argparse.ArgumentParser()).parse_args(sys.argv[1:]), backend=stub_backend))
"""


def _start(folder: Path, out: Path) -> tuple[subprocess.Popen, str]:
    proc = subprocess.Popen([sys.executable, "-c", KILL_SCRIPT.format(repo=str(REPO)), str(folder), "--out", str(out),
                             "--no-browser"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    lines = []
    while not lines or "http://127.0.0.1:" not in lines[-1]:  # "adding ... to the context" may come first
        lines.append(proc.stdout.readline())
        if not lines[-1]:  # the server exited
            raise AssertionError("".join(lines) + proc.stderr.read())
    return proc, lines[-1].split()[2]


def test_sigkill_during_accepts_loses_nothing(images, tmp_path):
    folder, names = images
    out = tmp_path / "out"
    proc, url = _start(folder, out)
    try:
        confirmed = [post(url + "api/accept", {"image": names[0], "interactions": {"pos_points": [[32, 20]]}})["accepted"]]
        # more accepts in flight while the process is killed
        def accept_rest():
            try:
                for n in names[1:]:
                    post(url + "api/accept", {"image": n, "interactions": {"boxes": [[4, 4, 40, 40]]}})
            except OSError:  # the server died mid-request: that is the point
                pass

        threading.Thread(target=accept_rest, daemon=True).start()
        time.sleep(0.02)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)
    with serve(folder, out) as (url, app):  # the restart (in-process: the same code, without a second start-up)
        s = get(url + "api/state")
        assert sorted(app.segmenter.context_keys) == sorted(s["accepted"])
    assert set(confirmed[0]) <= set(s["accepted"])
    on_disk = sorted(p.name for p in (out / "masks").iterdir() if not p.name.startswith("."))
    assert sorted(Path(n).stem + ".png" for n in s["accepted"]) == on_disk  # every mask on disk is accepted
    for name in s["accepted"]:
        m = read_mask(out / "masks" / f"{Path(name).stem}.png")
        assert m.shape == (SIZE, SIZE) and m.any()
    assert json.loads((out / "session.json").read_text())["accepted"] == s["accepted"]


@pytest.mark.parametrize("fmt", ["segicl", "nnunet"])
def test_export_round_trip(images, tmp_path, fmt):
    from segicl.annotate.app import add_arguments, main

    folder, names = images
    out = tmp_path / "out"
    with serve(folder, out) as (url, _):
        for n, p in zip(names[:3], ([32, 20], [32, 26], [32, 32])):
            post(url + "api/accept", {"image": n, "interactions": {"pos_points": [p]}})
    dest = tmp_path / "export" / f"ds_{fmt}"
    args = add_arguments(__import__("argparse").ArgumentParser()).parse_args(
        [str(folder), "--out", str(out), "--export", fmt, "--export-to", str(dest), "--label", "disc"])
    assert main(args) == 0
    assert main(args) == 2  # never over an existing export
    if fmt == "nnunet":
        from segicl.data.nnunet import load_nnunet, nnunet_to_2d

        nn = load_nnunet(dest)
        assert nn.labels == {1: "disc"} and sorted(c.name for c in nn.cases) == ["img00", "img01", "img02"]
        dest = nnunet_to_2d(dest, tmp_path / "back")
    from segicl.data import load_dataset

    ds = load_dataset(dest, verify=True)
    assert ds.labels == {255: "disc"} and sorted(ds.stems("all")) == ["img00", "img01", "img02"]
    for stem in ds.stems("all"):
        sample = ds.sample(stem, 255)
        assert np.array_equal(sample.mask, read_mask(out / "masks" / f"{stem}.png"))
        assert np.array_equal(np.asarray(sample.image.convert("L")), np.asarray(Image.open(folder / f"{stem}.png")))


def test_with_the_real_interactive_segmenter(images, tmp_path):
    """The default backend (segicl.interactive, training-free): a click segments the disc under it, an
    accepted image joins the context and the next image is predicted from it before any click."""
    from segicl.annotate.app import Annotator, default_backend

    folder, names = images
    app = Annotator(Session(folder, tmp_path / "out"), *default_backend(""))
    assert app.api_predict({"image": names[0], "interactions": {}})["area"] == 0  # nothing known yet
    m = decode_mask(app.api_predict({"image": names[0], "interactions": {"pos_points": [[32, 20]]}})["mask"])
    assert m[32, 20] and not m[2, 62] and not m[60, 60]
    s = app.api_accept({"image": names[0], "interactions": {"pos_points": [[32, 20]]}})
    assert app.segmenter.context_keys == [names[0]] and s["current"] == names[1]
    nxt = decode_mask(app.api_predict({"image": names[1], "interactions": {}})["mask"])
    assert nxt[32, 26] and not nxt[2, 62]


def test_the_shipped_model_can_propose(images, tmp_path):
    """--model shipped: the pipeline reads the accepted images and proposes before any click."""
    from segicl.annotate.app import Annotator, default_backend

    folder, names = images
    segmenter, parse = default_backend("the bright disc", "shipped")
    assert segmenter.pipeline is not None and segmenter.text == "Segment the bright disc."
    app = Annotator(Session(folder, tmp_path / "out"), segmenter, parse)
    app.api_accept({"image": names[0], "interactions": {"pos_points": [[32, 20]]}})
    out = app.api_predict({"image": names[1], "interactions": {}})
    assert segmenter._queries[names[1]].model_prior is not None and out["area"] > 0
    args = argparse.Namespace(export=None, images=folder, out=tmp_path / "out2", order=None, text=None,
                              model=str(tmp_path / "no_such_checkpoint"), port=0, no_browser=True)
    assert main(args) == 2  # a bad checkpoint stops with a message before serving


def test_cli_plugin_is_declared_and_light():
    import argparse
    import tomllib

    from segicl.annotate.app import register

    eps = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["entry-points"]["segicl.commands"]
    assert eps["annotate"] == "segicl.annotate.app:register"
    sub = argparse.ArgumentParser().add_subparsers(dest="command")
    register(sub)
    args = sub.choices["annotate"].parse_args(["imgs", "--out", "o", "--order", "uncertain", "--no-browser"])
    assert args.order == "uncertain" and args.port == 0 and args.no_browser and args.export is None
    code = "import sys, segicl.annotate.app; print(sorted(m for m in ('torch', 'faiss', 'diffusers') if m in sys.modules))"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                          cwd=REPO).stdout.strip() == "[]"


def test_volume_slice_by_slice(tmp_path):
    """A NIfTI volume in the folder is annotated slice by slice (stems <volume>_s<index>); once every
    slice is accepted its mask is written as NIfTI on the volume's grid; export keeps the slices."""
    from segicl.annotate.export import export_session
    from segicl.data import load_dataset
    from segicl.volumes import label_slices, read_label_volume, read_volume
    from tests.volume_files import phantom, write_nifti

    folder = tmp_path / "images"
    write_images(folder, n=1, bad=False)
    write_nifti(folder / "ct.nii.gz", phantom()[0])
    (folder / "bad.nii.gz").write_bytes(b"not a volume")
    out = tmp_path / "out"
    with serve(folder, out) as (url, app):
        s = get(url + "api/state")
        slices = [n for n in s["images"] if n.startswith("ct_s")]
        assert len(slices) == 9 and slices[0] == "ct_s000" and s["images"][-1] == "img00.png"
        assert [e["file"] for e in s["errors"]] == ["bad.nii.gz"]
        first = Image.open(__import__("io").BytesIO(get(url + "api/image?name=ct_s004")))
        assert first.mode == "L"
        for i, n in enumerate(slices):
            assert not (out / "masks" / "ct.nii.gz").exists()
            s = post(url + "api/accept", {"image": n, "interactions": {"boxes": [[1, 1, 3 + i, 5]]}})
            assert s["saved"] == str(out / "masks" / f"{n}.png")
        session = app.session
    vol = read_volume(folder / "ct.nii.gz")
    lab = read_label_volume(out / "masks" / "ct.nii.gz", like=vol)  # same grid, checked
    stack = label_slices(lab, session.items["ct_s000"].axis)
    assert stack.shape[0] == 9 and set(np.unique(stack)) == {0, 1}
    for i, n in enumerate(slices):
        assert np.array_equal(stack[i] > 0, read_mask(out / "masks" / f"{n}.png"))
    ds = load_dataset(export_session(session, tmp_path / "export", "segicl"), verify=True)
    assert sorted(ds.stems("all")) == sorted(slices) and ds.group("ct_s003") == "ct"
    assert ds.read_image("ct_s004").size == first.size


def test_16_bit_images_are_windowed_not_clipped(tmp_path):
    from segicl.annotate.export import export_session
    from segicl.data import load_dataset

    folder = tmp_path / "images"
    folder.mkdir()
    Image.fromarray((np.arange(SIZE * SIZE).reshape(SIZE, SIZE) * 12).astype(np.uint16)).save(folder / "deep.png")
    with serve(folder, tmp_path / "out") as (url, app):
        shown = np.asarray(Image.open(__import__("io").BytesIO(get(url + "api/image?name=deep.png"))))
        assert shown.dtype == np.uint8 and shown.min() == 0 and shown.max() == 255 and 100 < shown.mean() < 155
        post(url + "api/accept", {"image": "deep.png", "interactions": {"pos_points": [[32, 32]]}})
        ds = load_dataset(export_session(app.session, tmp_path / "export"), verify=True)
    assert ds.image_mode == "L" and np.array_equal(np.asarray(ds.read_image("deep")), shown)


def test_an_image_that_fails_to_decode_is_left_out_not_fatal(images, tmp_path):
    folder, names = images
    data = (folder / names[0]).read_bytes()
    (folder / names[0]).write_bytes(data[: len(data) // 2])  # a valid header, truncated pixels
    with serve(folder, tmp_path / "out") as (url, app):
        assert get(url + "api/state")["current"] == names[0]  # the header check passes
        with pytest.raises(urllib.error.HTTPError) as e:
            post(url + "api/predict", {"image": names[0], "interactions": {}})
        assert e.value.code == 400 and "left out" in json.loads(e.value.read())["error"]
        s = get(url + "api/state")
        assert s["current"] == names[1] and names[0] not in s["images"]
        assert [e["file"] for e in s["errors"]] == ["broken.png", names[0]] and "truncated" in s["errors"][1]["error"]
        assert post(url + "api/accept", {"image": names[1], "interactions": {}})["current"] == names[2]


def test_click_model_option(images, tmp_path, capsys):
    """--click-model: a saved interactive network reads the clicks; none keeps the random walker; a
    bad folder stops with a message before serving."""
    import torch

    from segicl.annotate.app import click_net_for, default_backend
    from segicl.click_net import ClickNet, ClickNetConfig

    torch.manual_seed(0)
    ClickNet(ClickNetConfig(size=32, channels=(8, 8, 8), strides=(2, 2))).save_pretrained(tmp_path / "click")
    assert click_net_for("none") is None
    segmenter, _ = default_backend("", None, str(tmp_path / "click"))
    assert isinstance(segmenter.click_net, ClickNet)
    folder, names = images
    args = argparse.Namespace(export=None, images=folder, out=tmp_path / "out", order=None, text=None, model=None,
                              click_model=str(tmp_path / "no_such_net"), port=0, no_browser=True)
    assert main(args) == 2
    assert "--click-model" in capsys.readouterr().err
