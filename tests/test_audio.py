"""Audio files in and out: non-finite samples are refused both ways, naming the file."""
import os

import numpy as np
import pytest
import soundfile as sf
import torch

from codicodec_flow.codec.audio import read_audio, write_wav
from codicodec_flow.errors import AudioError


def test_non_finite_audio_is_never_written(tmp_path):
    wave = torch.zeros(2, 4800)
    wave[1, 100] = float("inf")
    with pytest.raises(AudioError, match="out.wav: not written: the audio holds NaN or infinite samples"):
        write_wav(tmp_path / "out.wav", wave)
    assert os.listdir(tmp_path) == []  # no WAV, no temporary
    write_wav(tmp_path / "ok.wav", torch.full((2, 4800), 0.5))
    assert sf.info(str(tmp_path / "ok.wav")).frames == 4800


def test_non_finite_audio_is_refused_when_read(tmp_path):
    data = np.zeros((96_000, 1), np.float32)
    data[72_000] = np.nan
    sf.write(str(tmp_path / "nan.wav"), data, 48_000, subtype="FLOAT")
    with pytest.raises(AudioError, match=r"nan.wav: the audio holds NaN or infinite samples \(first at 1.50 s\)"):
        read_audio(tmp_path / "nan.wav")
