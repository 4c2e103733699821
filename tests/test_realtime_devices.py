"""The sound-card paths (PortAudio output and input) against a fake `sounddevice`: no sound card needed."""
import sys
import threading
import time
import types

import numpy as np
import pytest

from codicodec_flow.codec import CHUNK_SAMPLES
from codicodec_flow.realtime.live_input import DeviceInput
from codicodec_flow.realtime.sinks import AudioDeviceError, SoundDeviceSink, WavWriter, open_sink
from test_realtime import make_engine


class _Stream:
    """Calls the callback from a thread with `blocksize` frames, much faster than real time."""

    def __init__(self, callback, blocksize, fill=None, finished_callback=None):
        self.callback, self.blocksize, self.fill, self.finished = callback, blocksize, fill, finished_callback
        self._stop, self._thread = threading.Event(), None

    def start(self):
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self):
        try:
            while not self._stop.is_set():
                self.fill(self)
                time.sleep(0.0005)
        except FakeSD.CallbackStop:
            pass
        if self.finished:
            self.finished()

    def stop(self):
        self._stop.set()
        if self._thread is not None:
            self._thread.join(2)

    close = stop

    def __enter__(self):
        self.start()
        return self

    def __exit__(self, *exc):
        self.stop()


class FakeSD(types.ModuleType):
    class CallbackStop(Exception):
        pass

    class PortAudioError(Exception):
        pass

    def __init__(self, rate=48_000, in_channels=2, devices=True):
        super().__init__("sounddevice")
        self.rate, self.in_channels, self.devices = rate, in_channels, devices
        self.played: list[np.ndarray] = []
        self.t = 0

    def query_devices(self, device=None, kind=None):
        if not self.devices:
            raise self.PortAudioError("Error querying device -1")
        return {"name": "fake", "default_samplerate": float(self.rate), "max_input_channels": self.in_channels}

    def OutputStream(self, samplerate, channels, dtype, device, callback, finished_callback):
        def fill(stream):
            out = np.full((1000, channels), np.nan, dtype=np.float32)  # 1000: not a divisor of a chunk
            try:
                callback(out, 1000, None, None)
            finally:
                self.played.append(out.copy())
        return _Stream(callback, 1000, fill, finished_callback)

    def InputStream(self, samplerate, channels, dtype, device, callback):
        def fill(stream):
            n = 512
            t = (self.t + np.arange(n)) / samplerate
            self.t += n
            block = np.repeat(np.sin(2 * np.pi * 220 * t)[:, None], channels, axis=1).astype(np.float32)
            callback(block * 0.5, n, None, None)
        return _Stream(callback, 512, fill)


def test_output_through_portaudio_plays_every_sample(monkeypatch, tmp_path):
    sd = FakeSD()
    monkeypatch.setitem(sys.modules, "sounddevice", sd)
    sink = open_sink("sounddevice")
    assert isinstance(sink, SoundDeviceSink) and sink.device_name == "fake"
    engine = make_engine(sink, max_chunks=3, recorder=WavWriter(tmp_path / "rec.wav"))
    engine.run()
    played = np.concatenate(sd.played)  # (n, 2)
    assert not np.isnan(played).any()  # every frame handed to the card was filled
    import soundfile as sf
    rec, _ = sf.read(tmp_path / (engine.recorder.close().name), dtype="float32")
    n = 3 * CHUNK_SAMPLES
    assert played.shape[0] >= n and np.abs(played[:n] - rec).max() < 1e-4  # 24-bit file vs float: same audio
    assert not played[n:].any()  # after the end, only silence


def test_no_output_device_is_a_clear_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "sounddevice", FakeSD(devices=False))
    with pytest.raises(AudioDeviceError, match="no audio output device.*--sink wav"):
        open_sink("sounddevice")


def test_device_input_resamples_to_48k_stereo_chunks(monkeypatch):
    monkeypatch.setitem(sys.modules, "sounddevice", FakeSD(rate=44_100, in_channels=1))
    src = DeviceInput()
    stop = threading.Event()
    try:
        chunks = [src.read(stop) for _ in range(2)]
    finally:
        src.close()
    assert [c.index for c in chunks] == [0, 1] and chunks[0].complete_at <= chunks[1].complete_at
    for c in chunks:
        assert c.audio.shape == (2, CHUNK_SAMPLES) and (c.audio[0] == c.audio[1]).all()  # mono on both sides
    spectrum = np.abs(np.fft.rfft(chunks[1].audio[0].numpy()))
    assert abs(np.argmax(spectrum) * 48_000 / CHUNK_SAMPLES - 220) < 3  # still 220 Hz after resampling


def test_device_input_drops_the_oldest_when_the_engine_lags(monkeypatch):
    monkeypatch.setitem(sys.modules, "sounddevice", FakeSD())
    src = DeviceInput()
    try:
        deadline = time.monotonic() + 10
        while src.dropped == 0 and time.monotonic() < deadline:  # nobody reads: chunks pile up
            time.sleep(0.01)
        assert src.dropped > 0 and src._queue.qsize() <= DeviceInput.MAX_WAITING
    finally:
        src.close()
