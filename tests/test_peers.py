"""Smoke tests of benchmarks/peers.py at tiny sizes (the full-size numbers come from running it).

Each peer runs once with one timed call, and its record is checked for sanity: peaks and
times positive, errors finite, the ratios consistent with the fields, and both outputs being
what they claim: the untiled output equals a freshly built model's own output on the same input,
and the peer's output equals the peer's method called directly. A peer whose package is missing
is skipped.
"""

from __future__ import annotations

import math
import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "benchmarks"))

import peers  # noqa: E402

# The same model (same seed) on the same input in the same process runs the same kernels:
# the outputs must be identical, not merely close.
EXACT = dict(rtol=0.0, atol=0.0)


def _check_record(rec: peers.PeerRecord, shape: tuple[int, ...]) -> None:
    assert rec.input_shape == shape
    assert rec.untiled_peak_bytes > 0 and rec.peer_peak_bytes > 0
    assert rec.untiled_time.median_s > 0 and rec.peer_time.median_s > 0
    assert rec.untiled_time.runs == rec.peer_time.runs == 1
    for v in (rec.max_abs_error, rec.mean_abs_error, rec.output_magnitude):
        assert math.isfinite(v) and v >= 0
    assert rec.mean_abs_error <= rec.max_abs_error
    assert rec.output_magnitude > 0
    assert rec.peak_ratio == pytest.approx(rec.untiled_peak_bytes / rec.peer_peak_bytes)
    assert rec.latency_ratio == pytest.approx(rec.peer_time.median_s / rec.untiled_time.median_s)
    assert rec.relative_error == pytest.approx(rec.max_abs_error / rec.output_magnitude)
    want, got = rec.outputs.untiled, rec.outputs.peer
    assert want.shape == got.shape
    assert rec.max_abs_error == pytest.approx(float((got.double() - want.double()).abs().max()))
    assert rec.output_magnitude == pytest.approx(float(want.abs().max()))
    # the record renders as one table row
    row = peers.render([rec], [], [], 1.0, None).splitlines()[-1]
    assert row.startswith(f"| {rec.peer} |") and row.count("|") == 17


def test_vae_tiling():
    pytest.importorskip("diffusers")
    rec = peers.vae_tiling(latent=8, tile=32, repeats=1, keep_outputs=True)
    _check_record(rec, (1, 4, 8, 8))
    z = peers.example_input((1, 4, 8, 8))
    vae = peers.build_vae(32)
    with torch.no_grad():
        own = vae.decode(z).sample
        vae.enable_tiling()
        tiled = vae.decode(z).sample
    torch.testing.assert_close(rec.outputs.untiled, own, **EXACT)
    torch.testing.assert_close(rec.outputs.peer, tiled, **EXACT)
    assert rec.max_abs_error > 0  # 8x8 latents in 4-latent tiles: the tiled path ran
    assert "3x3 tiles" in rec.setting


def test_vae_tiling_refuses_a_decode_that_does_not_tile():
    pytest.importorskip("diffusers")
    with pytest.raises(ValueError, match="would not tile"):
        peers.vae_case(latent=4, tile=32)


@pytest.mark.parametrize("norm", ["instance", "batch"])
def test_monai_sliding_window(norm):
    pytest.importorskip("monai")
    from monai.inferers import sliding_window_inference

    rec = peers.monai_sliding_window(norm, size=64, roi=32, repeats=1, keep_outputs=True)
    _check_record(rec, (1, 3, 64, 64))
    x = peers.example_input((1, 3, 64, 64))
    net = peers.build_basicunet(norm)
    with torch.no_grad():
        own = net(x)
        window = sliding_window_inference(x, (32, 32), 1, net, overlap=0.25, mode="gaussian")
    torch.testing.assert_close(rec.outputs.untiled, own, **EXACT)
    torch.testing.assert_close(rec.outputs.peer, window, **EXACT)
    assert rec.max_abs_error > 0  # windows smaller than the image: not the whole-image net
    assert 0.0 <= rec.class_change_share <= 1.0
    assert rec.class_change_share == pytest.approx(
        float((window.argmax(1) != own.argmax(1)).double().mean()))


def test_lightstream_streaming():
    pytest.importorskip("lightstream")
    rec = peers.lightstream_streaming(size=128, tile=96, repeats=1, keep_outputs=True)
    _check_record(rec, (1, 3, 128, 128))
    x = peers.example_input((1, 3, 128, 128))
    with torch.no_grad():
        own = peers.build_resnet18_trunk()(x)
    torch.testing.assert_close(rec.outputs.untiled, own, **EXACT)
    assert "tiles per call" in rec.note


def test_lightstream_leaves_the_grad_mode_alone():
    pytest.importorskip("lightstream")
    with torch.no_grad():
        peers.lightstream_case(size=128, tile=96)  # its statistics switch grad mode on
        assert not torch.is_grad_enabled()


def test_cli_lists_the_peers(capsys):
    assert peers.main(["--list"]) == []
    out = capsys.readouterr().out
    assert all(name in out for name in peers.PEERS)


def test_cli_skips_a_peer_whose_package_is_missing(monkeypatch, capsys, tmp_path):
    monkeypatch.setattr(peers, "_have", lambda pkg: pkg != "lightning")
    md = tmp_path / "peers.md"
    assert peers.main(["--only", "lightstream_512", "--md", str(md)]) == []
    text = md.read_text()
    assert "Skipped: lightstream_512 (lightning not installed)." in text
    assert "torch " + torch.__version__.split("+")[0] in text
