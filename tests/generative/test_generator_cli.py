"""`fedforge generator train/sample` and the one-sentence errors (exit code 2) of generator input."""
from __future__ import annotations

import json
import pickle
import sys

import numpy as np
import pytest
from PIL import Image
from safetensors.torch import load_file

from fedforge.cli import main
from fedforge.generative import load_generator
from fedforge.generative.images import image_grid
from tests.support.tiny_stylegan import write_stylegan_pickle

TINY = ["--dataset", "digits", "--channels", "8", "--d-channels", "8", "--batch-size", "16", "--no-progress"]


def test_generator_train_writes_weights_curves_samples_and_resumes_exactly(tmp_path, capsys):
    a, b = tmp_path / "a", tmp_path / "b"
    assert main(["generator", "train", "--out", str(a), "--steps", "6", "--checkpoint-every", "3", *TINY]) == 0
    for name in ("generator.safetensors", "generator.json", "samples.png", "losses.png", "losses.jsonl", "checkpoint.json"):
        assert (a / name).is_file(), name
    cfg = json.loads((a / "generator.json").read_text())
    assert cfg["steps"] == 6 and cfg["dataset"] == "digits" and cfg["latent_dim"] == 128
    # the recorded command names every non-default option, so it reproduces the weights
    assert cfg["command"] == (f"fedforge generator train --dataset digits --steps 6 --batch-size 16 --channels 8 "
                              f"--d-channels 8 --out {a}")
    assert Image.open(a / "samples.png").size[0] > 8 * 8
    log = [json.loads(line) for line in (a / "losses.jsonl").read_text().splitlines()]
    assert log[-1]["step"] == 6 and all(np.isfinite(r["d_loss"]) and np.isfinite(r["g_loss"]) for r in log)
    # the same training interrupted after 3 steps and resumed gives the same weights
    assert main(["generator", "train", "--out", str(b), "--steps", "3", "--checkpoint-every", "3", *TINY]) == 0
    assert main(["generator", "train", "--out", str(b), "--steps", "6", "--checkpoint-every", "3", *TINY]) == 0
    wa, wb = load_file(str(a / "generator.safetensors")), load_file(str(b / "generator.safetensors"))
    assert all(np.array_equal(wa[k].numpy(), wb[k].numpy()) for k in wa)
    # and the trained folder is a generator spec
    out = tmp_path / "grid.png"
    assert main(["generator", "sample", f"builtin:{a}", "--out", str(out), "-n", "4"]) == 0
    assert out.is_file()
    capsys.readouterr()
    # another architecture in the same folder is refused
    assert main(["generator", "train", "--out", str(a), "--steps", "7", "--latent-dim", "16", *TINY]) == 2
    assert "another configuration" in capsys.readouterr().err


@pytest.mark.parametrize("argv, needle", [
    (["generator", "sample", "builtin:{tmp}/missing", "--out", "{tmp}/x.png"], "fedforge generator train"),
    (["generator", "sample", "stylegan:{tmp}/net.pkl", "--out", "{tmp}/x.png"], "--trust-generator-pickle"),
    (["generator", "sample", "stylegan:{tmp}/nvlabs.pkl", "--out", "{tmp}/x.png", "--trust-generator-pickle"], "dnnlib and torch_utils"),
    (["generator", "sample", "nosuch:x", "--out", "{tmp}/x.png"], "unknown generator"),
    (["generator", "train", "--out", "{tmp}/g", "--steps", "0"], "--steps must be > 0"),
    (["run", "--algorithm", "fedktl", "--generator", "builtin:{tmp}/missing", "--rounds", "1", "--out", "{tmp}/r1"], "is missing"),
    (["run", "--algorithm", "fedktl", "--generator", "stylegan:{tmp}/net.pkl", "--rounds", "1", "--out", "{tmp}/r2"], "--trust-generator-pickle"),
    (["run", "--algorithm", "fedktl", "--set", "lam=-1", "--rounds", "1", "--out", "{tmp}/r3"], "lam must be a number >= 0"),
])
def test_bad_generator_input_is_one_sentence_exit_2(tmp_path, capsys, argv, needle):
    (tmp_path / "net.pkl").write_bytes(pickle.dumps({"G_ema": None}))
    (tmp_path / "nvlabs.pkl").write_bytes(b"\x80\x02ctorch_utils.persistence\n_reconstruct_persistent_obj\n)R.")
    rc = main(["-q", *[a.format(tmp=tmp_path) for a in argv]])
    err = capsys.readouterr().err
    assert rc == 2, err
    assert needle in err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1


def test_missing_diffusers_extra_exit_2(tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "diffusers", None)  # as if the optional extra were not installed
    assert main(["-q", "generator", "sample", f"diffusers:{tmp_path}", "--out", str(tmp_path / "x.png")]) == 2
    assert 'pip install "fedforge[diffusers]"' in capsys.readouterr().err


def png_pixels(path, upscale: int = 2) -> np.ndarray:
    """A grid written by `fedforge generator sample`, without its nearest-neighbour upscaling."""
    return np.asarray(Image.open(path))[::upscale, ::upscale]


def test_stylegan_pickle_through_the_cli_only_with_the_trust_flag(tmp_path, capsys):
    """A tiny StyleGAN-shaped pickle: refused without --trust-generator-pickle (one sentence, exit code 2), loaded
    with it by `fedforge generator sample` (the grid is the back-end's images) and by a FedKTL run."""
    pkl = write_stylegan_pickle(tmp_path / "net.pkl")
    grid = tmp_path / "grid.png"
    sample = ["-q", "generator", "sample", f"stylegan:{pkl}", "--out", str(grid), "-n", "4", "--seed", "3"]
    assert main(sample) == 2
    err = capsys.readouterr().err
    assert "--trust-generator-pickle" in err and "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert not grid.exists()
    assert main([*sample, "--trust-generator-pickle"]) == 0
    g = load_generator(f"stylegan:{pkl}", trust_pickle=True)
    assert np.array_equal(png_pixels(grid), image_grid(g.synthesize(g.sample_prior(4, 3))))
    run = tmp_path / "run"
    assert main(["-q", "run", "--algorithm", "fedktl", "--dataset", "digits", "--model", "mlp", "--clients", "2",
                 "--rounds", "1", "--generator", f"stylegan:{pkl}", "--trust-generator-pickle",
                 "--set", "server_epochs=2", "--out", str(run), "--no-progress"]) == 0, capsys.readouterr().err
    last = json.loads((run / "metrics.jsonl").read_text().splitlines()[-1])
    assert np.isfinite(last["server_mmd"]) and last["server_generate_seconds"] >= 0
    assert (run / "artifacts" / "generated_round0001.png").is_file()


def test_diffusers_folder_through_the_cli(tmp_path, capsys, tiny_sd, monkeypatch):
    """`fedforge generator sample diffusers:DIR` with a prompt and steps, and FedKTL with the folder and a prompt."""
    from fedforge.generative.diffusion import DiffusersGenerator

    grid = tmp_path / "grid.png"
    assert main(["-q", "generator", "sample", f"diffusers:{tiny_sd}", "--prompt", "a cat", "--steps", "2",
                 "--guidance", "2", "-n", "2", "--out", str(grid)]) == 0, capsys.readouterr().err
    g = load_generator(f"diffusers:{tiny_sd}", steps=2, guidance=2.0)
    assert np.array_equal(png_pixels(grid), image_grid(g.synthesize(g.sample_prior(2, 0), "a cat")))
    seen = []  # what FedKTL's server asks the back-end for (the real synthesize runs)
    synthesize = DiffusersGenerator.synthesize

    def spy(self, latents, condition=None):
        seen.append((condition, self.steps, self.guidance, tuple(latents.shape)))
        return synthesize(self, latents, condition)

    monkeypatch.setattr(DiffusersGenerator, "synthesize", spy)
    run = tmp_path / "run"
    assert main(["-q", "run", "--algorithm", "fedktl", "--dataset", "digits", "--model", "mlp", "--clients", "2",
                 "--rounds", "1", "--generator", f"diffusers:{tiny_sd}", "--set", "prompt=a photo of a cat",
                 "--set", "gen_steps=2", "--set", "guidance=2", "--set", "server_epochs=2", "--out", str(run),
                 "--no-progress"]) == 0, capsys.readouterr().err
    assert seen == [("a photo of a cat", 2, 2.0, (10, 4 * 8 * 8))], "one image per class from its latent centroid"
    assert (run / "artifacts" / "generated_round0001.png").is_file()


def test_list_generators(capsys):
    assert main(["list", "generators"]) == 0
    out = capsys.readouterr().out
    assert "builtin" in out and "diffusers" in out and "stylegan" in out


def test_weight_average_follows_the_generator_early_and_reaches_its_decay():
    from fedforge.generative.builtin import ema_decay_at

    assert ema_decay_at(0, 0.999) == pytest.approx(0.1)
    # what is left of the random initialisation after 250 steps: 78 % with a fixed 0.999, nothing visible with the ramp
    left = 1.0
    for k in range(250):
        left *= ema_decay_at(k, 0.999)
    assert left < 1e-6 and 0.999**250 > 0.7
    assert ema_decay_at(20_000, 0.999) == 0.999
    assert all(ema_decay_at(k, 0.999) <= ema_decay_at(k + 1, 0.999) for k in range(12_000))
