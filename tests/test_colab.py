"""The Colab notebook: valid nbformat 4 with no stored outputs, and every cell but the Colab-only ones
runs top to bottom in plain Python on its SMALL_RUN path (CPU, spectral codec, tiny model)."""
from __future__ import annotations

import json
import math
import zipfile
from pathlib import Path

import soundfile as sf
import torch

from codicodec_flow.codec import CHUNK_SAMPLES, CHUNK_SECONDS, SAMPLE_RATE

NOTEBOOK = Path(__file__).resolve().parents[1] / "colab" / "codicodec_flow.ipynb"
COLAB_ONLY = "# colab-only"
PNG = b"\x89PNG\r\n\x1a\n"


def load_notebook() -> dict:
    return json.loads(NOTEBOOK.read_text(encoding="utf-8"))


def source(cell: dict) -> str:
    text = cell["source"]
    return "".join(text) if isinstance(text, list) else text


def code_cells(nb: dict) -> list[dict]:
    return [c for c in nb["cells"] if c["cell_type"] == "code"]


def plain_sources(nb: dict) -> list[str]:
    """Code cells in order, less those only Colab can run."""
    return [source(c) for c in code_cells(nb) if not source(c).startswith(COLAB_ONLY)]


def test_notebook_is_nbformat4_without_outputs():
    nb = load_notebook()
    assert nb["nbformat"] == 4 and isinstance(nb["nbformat_minor"], int)
    assert isinstance(nb["metadata"], dict) and isinstance(nb["cells"], list) and nb["cells"]
    assert nb["cells"][0]["cell_type"] == "markdown"
    for cell in nb["cells"]:
        assert cell["cell_type"] in ("markdown", "code") and isinstance(cell["metadata"], dict)
        assert isinstance(cell["source"], (list, str)) and source(cell).strip()
        if cell["cell_type"] == "code":
            assert cell["outputs"] == [] and cell["execution_count"] is None, source(cell)[:60]
    params = [c for c in code_cells(nb) if "parameters" in c["metadata"].get("tags", [])]
    assert len(params) == 1 and source(params[0]).startswith("# parameters")


def test_plain_cells_compile_and_use_no_shell_or_magics():
    nb = load_notebook()
    for i, src in enumerate(plain_sources(nb)):
        compile(src, f"<cell {i}>", "exec")
        bad = [line for line in src.splitlines() if line.lstrip().startswith(("!", "%"))]
        assert not bad, f"cell {i} needs IPython outside a '{COLAB_ONLY}' cell: {bad}"
    setup = "\n".join(source(c) for c in code_cells(nb) if source(c).startswith(COLAB_ONLY))
    pip = [line for line in setup.splitlines() if "pip install" in line]
    assert pip and not any("torch" in line for line in pip), "installing must keep Colab's own CUDA torch"


def run_notebook(**overrides) -> dict:
    """Exec the plain cells in one namespace, with `overrides` applied right after the parameters cell."""
    ns: dict = {"__name__": "__main__"}
    for i, src in enumerate(plain_sources(load_notebook())):
        exec(compile(src, f"<cell {i}>", "exec"), ns)
        if src.startswith("# parameters"):
            ns.update(overrides)
    return ns


def test_small_run_executes_top_to_bottom(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    work = tmp_path / "work"
    ns = run_notebook(SMALL_RUN=True, WORK_DIR=str(work), AUDIO_DIR=None, PROMPT_WAV=None)

    latents = ns["latents_dir"]
    assert latents.parent == work / "latents" and (latents / "manifest.json").exists()
    assert len(json.loads((latents / "manifest.json").read_text())["shards"]) == 3
    assert len(list(latents.rglob("*.0000.npy"))) == 3  # a new folder: float32 arrays

    run = ns["run_dir"]
    ema = torch.load(run / "ema.pt", weights_only=True)
    assert ema["step"] == 6 and (run / "last.pt").exists()  # two segments of 3: the second resumed
    assert (run / "training_curves.png").read_bytes()[:8] == PNG
    assert [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()
            if '"kind": "train"' in line] == [1, 2, 3, 4, 5, 6]

    out = work / "out"
    cont = sf.info(str(out / "continuation.wav"))
    assert cont.samplerate == SAMPLE_RATE and cont.channels == 2
    assert cont.frames == math.ceil(ns["duration"] / CHUNK_SECONDS) * CHUNK_SAMPLES
    prompt = sf.info(str(out / "prompt.wav"))
    assert prompt.frames == ns["prompt_chunks"] * CHUNK_SAMPLES and ns["prompt_chunks"] >= 1
    assert sf.info(str(out / "prompt_and_continuation.wav")).frames == prompt.frames + cont.frames
    assert (out / "spectrogram.png").read_bytes()[:8] == PNG

    figures = json.loads((ns["eval_dir"] / "eval.json").read_text())
    assert math.isfinite(figures["validation"]["loss"]) and figures["rollout"]["chunks"] == 20
    with zipfile.ZipFile(work / "results.zip") as archive:
        names = set(archive.namelist())
    assert {"out/continuation.wav", "out/spectrogram.png", f"runs/{run.name}/ema.pt"} <= names


def test_own_audio_and_prompt_then_train_further(tmp_path, monkeypatch):
    """Not SMALL_RUN: one file of the user's (its tail held out), an uploaded prompt, and a second pass that
    raises MAX_STEPS and continues the run instead of starting over."""
    from conftest import write_audio
    monkeypatch.chdir(tmp_path)
    song = write_audio(tmp_path / "mine" / "live" / "set1.flac", 12.0, sr=44_100, fmt="FLAC")
    riff = write_audio(tmp_path / "riff.wav", 5.0, sr=22_050, channels=1)
    before = song.read_bytes()
    settings = dict(WORK_DIR=str(tmp_path / "work"), AUDIO_DIR=str(song.parents[1]), CODEC="spectral",
                    PRESET="tiny", BATCH_SIZE=2, CROP_TOKENS=64, PLOT_EVERY=2, PROMPT_WAV=str(riff), PROMPT_S=3.0,
                    DURATION_S=2.0, NFE=2)
    ns = run_notebook(MAX_STEPS=2, **settings)
    assert ns["device"] == ("cuda" if torch.cuda.is_available() else "cpu")
    assert ns["audio_dir"] == song.parents[1] and ns["prompt_chunks"] == 4
    out = tmp_path / "work" / "out"
    assert sf.info(str(out / "continuation.wav")).frames == 3 * CHUNK_SAMPLES
    ns = run_notebook(MAX_STEPS=4, **{**settings, "PROMPT_WAV": None})  # the prompt: the held-out tail
    assert torch.load(ns["run_dir"] / "ema.pt", weights_only=True)["step"] == 4
    assert ns["source"] == song and 1 <= ns["prompt_chunks"] <= 4
    assert sf.info(str(out / "prompt.wav")).frames == ns["prompt_chunks"] * CHUNK_SAMPLES
    assert song.read_bytes() == before and [p.name for p in song.parent.iterdir()] == ["set1.flac"]
