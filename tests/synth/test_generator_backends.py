"""`fedforge synth` with the real generator back-ends: a tiny Stable-Diffusion-shaped diffusers folder (text to image
at iteration 0, diffusers' img2img for the variations, as PCEvolve) and a tiny StyleGAN-shaped pickle (loaded only
with --trust-generator-pickle)."""
from __future__ import annotations

import json

import numpy as np

from fedforge.cli import main
from fedforge.data import load_dataset
from tests.support.tiny_sd import tiny_sd  # noqa: F401 - a fixture
from tests.support.tiny_stylegan import write_stylegan_pickle


def run_cli(args, capsys):
    code = main(["-q", "synth", "--no-progress", *args])
    out = capsys.readouterr()
    return code, out.out, out.err


def private_digits(checkpoint) -> list[str]:
    return ["--private", "digits", "--class-subset", "0-1", "--shots", "3", "--encoder", f"checkpoint:{checkpoint}",
            "--eval-modes", ""]


def test_synth_with_a_diffusers_folder(tmp_path, capsys, tiny_sd, digits_checkpoint, monkeypatch):
    """One PCEvolve iteration with --generator diffusers:DIR: prompts per class at iteration 0, then the selected
    candidates (the generator's own 16 px images) varied by img2img at strength 0.8 under the same prompts."""
    from fedforge.generative.diffusion import DiffusersGenerator

    calls = []  # what the server asks the back-end for (the real methods run)
    synthesize, img2img = DiffusersGenerator.synthesize, DiffusersGenerator.img2img

    def spy_synthesize(self, latents, condition=None):
        calls.append(("synthesize", tuple(latents.shape), condition, self.steps, self.guidance))
        return synthesize(self, latents, condition)

    def spy_img2img(self, images, strength, condition=None, rng=None):
        out = img2img(self, images, strength, condition, rng)
        calls.append(("img2img", images.shape, condition, strength, out.shape))
        return out

    monkeypatch.setattr(DiffusersGenerator, "synthesize", spy_synthesize)
    monkeypatch.setattr(DiffusersGenerator, "img2img", spy_img2img)
    out = tmp_path / "syn"
    code, stdout, err = run_cli([*private_digits(digits_checkpoint), "--generator", f"diffusers:{tiny_sd}",
                                 "--gen-steps", "2", "--guidance", "2", "--gen-batch-size", "2", "--labels", "zero,one",
                                 "--selector", "pcevolve", "--epsilon", "1", "--iterations", "1", "--per-class", "3",
                                 "--out", str(out)], capsys)
    assert code == 0, err
    prompts = ["A photo image of zero", "A photo image of one"]
    assert calls == [("synthesize", (3, 4 * 8 * 8), p, 2, 2.0) for p in prompts] + \
        [("img2img", (3, 16, 16, 3), p, 0.8, (3, 16, 16, 3)) for p in prompts]
    s = json.loads((out / "summary.json").read_text())
    assert s["iterations"] == 1 and s["synthetic"]["images"] == 6 and s["synthetic"]["shape"] == [8, 8, 1]
    assert "2 steps" in json.loads((out / "config.json").read_text())["generator_repr"]
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert records[-1]["iteration"] == 1 and records[-1]["strength"] == 0.8 and records[-1]["candidates"] == 6
    assert len((out / "messages.jsonl").read_text().splitlines()) == 1
    ds = load_dataset(f"npz:{out / 'synthetic.npz'}")
    assert len(ds) == 6 and ds.num_classes == 2 and ds.x.std() > 0


def test_synth_with_a_stylegan_pickle_needs_the_trust_flag(tmp_path, capsys, digits_checkpoint):
    pkl = write_stylegan_pickle(tmp_path / "net.pkl")
    out = tmp_path / "syn"
    args = [*private_digits(digits_checkpoint), "--generator", f"stylegan:{pkl}", "--iterations", "1",
            "--per-class", "4", "--out", str(out)]
    code, _, err = run_cli(args, capsys)
    assert code == 2 and "Traceback" not in err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("fedforge: error: ") and "--trust-generator-pickle" in lines[0]
    assert not (out / "summary.json").exists()
    code, _, err = run_cli([*args, "--trust-generator-pickle"], capsys)
    assert code == 0, err
    s = json.loads((out / "summary.json").read_text())
    assert s["iterations"] == 1 and s["synthetic"]["images"] == 8 and s["synthetic"]["shape"] == [8, 8, 1]
    x = np.load(out / "synthetic.npz")["x"]
    assert x.shape == (8, 8, 8, 1) and x.std() > 0
