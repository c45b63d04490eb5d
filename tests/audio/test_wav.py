"""Tests for WAV reading, mixdown, resampling and the atomic reply writer."""

from __future__ import annotations

import asyncio
import os
import struct
import wave
from pathlib import Path

import numpy as np
import pytest
import soundfile

from voice.audio.wav import (
    SPEECH_SAMPLE_RATE,
    ReplyWavWriter,
    check_output_path,
    load_speech,
    read_wav,
    resample,
    to_mono,
    write_wav,
)
from voice.errors import AudioInputError, VoiceError

# ---------------------------------------------------------------------------
# Hand-built RIFF files, so tests can produce headers no encoder would write.


def make_chunk(chunk_id: bytes, body: bytes, size: int | None = None, pad: bool = True) -> bytes:
    declared = len(body) if size is None else size
    padding = b"\x00" if pad and len(body) % 2 == 1 else b""
    return chunk_id + struct.pack("<I", declared) + body + padding


def make_fmt(format_tag: int, channels: int, rate: int, bits: int, sub_format: int | None = None) -> bytes:
    block_align = channels * ((bits + 7) // 8)
    body = struct.pack("<HHIIHH", format_tag, channels, rate, rate * block_align, block_align, bits)
    if sub_format is None:
        return body
    # WAVE_FORMAT_EXTENSIBLE: cbSize, valid bits, channel mask, then the sub-format GUID
    # whose first two bytes are the real format tag.
    guid_tail = b"\x00\x00\x00\x00\x10\x00\x80\x00\x00\xaa\x00\x38\x9b\x71"
    return body + struct.pack("<HHI", 22, bits, 0) + struct.pack("<H", sub_format) + guid_tail


def make_riff(*chunks: bytes, riff_size: int | None = None, magic: bytes = b"RIFF", form: bytes = b"WAVE") -> bytes:
    payload = form + b"".join(chunks)
    size = len(payload) if riff_size is None else riff_size
    return magic + struct.pack("<I", size) + payload


# The fmt chunk of a 16-bit PCM mono file at 16 kHz, which most layout tests use.
MONO_16K_FMT = make_chunk(b"fmt ", make_fmt(1, 1, 16_000, 16))


def int16_bytes(values: list[int]) -> bytes:
    return np.array(values, dtype="<i2").tobytes()


def write_bytes(tmp_path: Path, data: bytes, name: str = "input.wav") -> Path:
    path = tmp_path / name
    path.write_bytes(data)
    return path


def sine(frequency: float, rate: int, seconds: float, amplitude: float = 0.5) -> np.ndarray:
    t = np.arange(int(rate * seconds)) / rate
    return (amplitude * np.sin(2 * np.pi * frequency * t)).astype(np.float32)


def peak_frequency(samples: np.ndarray, rate: int) -> float:
    spectrum = np.abs(np.fft.rfft(samples * np.hanning(len(samples))))
    return float(np.fft.rfftfreq(len(samples), 1 / rate)[np.argmax(spectrum)])


# ---------------------------------------------------------------------------
# Reading every supported encoding


@pytest.mark.parametrize(
    ("sample_width", "raw", "expected"),
    [
        (1, bytes([0, 128, 255, 64]), [-1.0, 0.0, 127 / 128, -0.5]),
        (2, int16_bytes([-32768, 0, 32767, 16384]), [-1.0, 0.0, 32767 / 32768, 0.5]),
        (3, b"\x00\x00\x80\x00\x00\x00\xff\xff\x7f\x00\x00\x40", [-1.0, 0.0, (2**23 - 1) / 2**23, 0.5]),
        (4, np.array([-(2**31), 0, 2**31 - 1, 2**30], dtype="<i4").tobytes(), [-1.0, 0.0, 1.0, 0.5]),
    ],
    ids=["pcm8-unsigned", "pcm16", "pcm24", "pcm32"],
)
def test_read_wav_pcm_from_stdlib_wave(tmp_path: Path, sample_width: int, raw: bytes, expected: list[float]) -> None:
    path = tmp_path / "pcm.wav"
    with wave.open(str(path), "wb") as output:
        output.setnchannels(1)
        output.setsampwidth(sample_width)
        output.setframerate(22_050)
        output.writeframes(raw)

    samples, rate = read_wav(path)

    assert rate == 22_050
    assert samples.dtype == np.float32
    assert samples.shape == (4, 1)
    np.testing.assert_allclose(samples[:, 0], expected, atol=1e-6)


@pytest.mark.parametrize(
    ("format_tag", "sub_format", "bits", "dtype"),
    [
        (3, None, 32, "<f4"),
        (3, None, 64, "<f8"),
        (0xFFFE, 3, 32, "<f4"),
        (0xFFFE, 3, 64, "<f8"),
        (0xFFFE, 1, 16, "<i2"),
        (0xFFFE, 1, 32, "<i4"),
    ],
    ids=["float32", "float64", "extensible-float32", "extensible-float64", "extensible-pcm16", "extensible-pcm32"],
)
def test_read_wav_hand_built_formats(
    tmp_path: Path, format_tag: int, sub_format: int | None, bits: int, dtype: str
) -> None:
    expected = np.array([[0.5, -0.25], [-1.0, 0.75], [0.0, 0.125]])
    if dtype.startswith("<f"):
        body = expected.astype(dtype).tobytes()
    else:
        full_scale = 2 ** (bits - 1)
        body = np.round(expected * full_scale).clip(-full_scale, full_scale - 1).astype(dtype).tobytes()
    data = make_riff(make_chunk(b"fmt ", make_fmt(format_tag, 2, 48_000, bits, sub_format)), make_chunk(b"data", body))

    samples, rate = read_wav(write_bytes(tmp_path, data))

    assert rate == 48_000
    assert samples.dtype == np.float32
    assert samples.shape == (3, 2)
    np.testing.assert_allclose(samples, expected, atol=1e-4)


@pytest.mark.parametrize("container", ["WAV", "WAVEX", "RF64"])
@pytest.mark.parametrize("subtype", ["PCM_U8", "PCM_16", "PCM_24", "PCM_32", "FLOAT", "DOUBLE"])
def test_read_wav_matches_soundfile(tmp_path: Path, container: str, subtype: str) -> None:
    rng = np.random.default_rng(7)
    original = rng.uniform(-0.9, 0.9, size=(1000, 3))
    path = tmp_path / "cross.wav"
    soundfile.write(path, original, 32_000, subtype=subtype, format=container)
    reference, reference_rate = soundfile.read(path, dtype="float32", always_2d=True)

    samples, rate = read_wav(path)

    assert rate == reference_rate == 32_000
    assert samples.shape == reference.shape == (1000, 3)
    np.testing.assert_allclose(samples, reference, atol=1e-4)


@pytest.mark.parametrize("rate", [1, 7, 8_000, 11_025, 96_000, 384_000])
def test_read_wav_any_sample_rate(tmp_path: Path, rate: int) -> None:
    data = make_riff(make_chunk(b"fmt ", make_fmt(1, 1, rate, 16)), make_chunk(b"data", int16_bytes([1, 2, 3])))

    _, read_rate = read_wav(write_bytes(tmp_path, data))

    assert read_rate == rate


def test_read_wav_many_channels(tmp_path: Path) -> None:
    frames = np.arange(6 * 5, dtype="<i2").reshape(5, 6) * 1000
    data = make_riff(make_chunk(b"fmt ", make_fmt(1, 6, 16_000, 16)), make_chunk(b"data", frames.tobytes()))

    samples, _ = read_wav(write_bytes(tmp_path, data))

    assert samples.shape == (5, 6)
    np.testing.assert_allclose(samples, frames / 32768.0, atol=1e-7)


def test_read_wav_float_clipped(tmp_path: Path) -> None:
    body = np.array([2.5, -3.0, np.nan, np.inf, -np.inf, 0.5], dtype="<f4").tobytes()
    data = make_riff(make_chunk(b"fmt ", make_fmt(3, 1, 16_000, 32)), make_chunk(b"data", body))

    samples, _ = read_wav(write_bytes(tmp_path, data))

    np.testing.assert_array_equal(samples[:, 0], [1.0, -1.0, 0.0, 1.0, -1.0, 0.5])


def test_read_wav_accepts_string_path(tmp_path: Path) -> None:
    data = make_riff(MONO_16K_FMT, make_chunk(b"data", int16_bytes([100])))
    path = write_bytes(tmp_path, data)

    samples, _ = read_wav(str(path))

    assert samples.shape == (1, 1)


# ---------------------------------------------------------------------------
# Container layout: unknown chunks, pad bytes and streaming sizes


def test_read_wav_skips_odd_sized_chunks(tmp_path: Path) -> None:
    data = make_riff(
        make_chunk(b"JUNK", b"abc"),
        MONO_16K_FMT,
        make_chunk(b"LIST", b"INFOISFT\x05\x00\x00\x00lavf5"),
        make_chunk(b"fact", struct.pack("<I", 2)),
        make_chunk(b"data", int16_bytes([1000, -1000])),
        make_chunk(b"id3 ", b"tag"),
    )

    samples, _ = read_wav(write_bytes(tmp_path, data))

    np.testing.assert_allclose(samples[:, 0], [1000 / 32768, -1000 / 32768])


def test_read_wav_tolerates_missing_pad_byte(tmp_path: Path) -> None:
    data = make_riff(
        MONO_16K_FMT,
        make_chunk(b"LIST", b"odd", pad=False),
        make_chunk(b"data", int16_bytes([7, 8])),
    )

    samples, _ = read_wav(write_bytes(tmp_path, data))

    assert samples.shape == (2, 1)


def test_read_wav_fmt_after_data(tmp_path: Path) -> None:
    data = make_riff(make_chunk(b"data", int16_bytes([1, 2, 3, 4])), make_chunk(b"fmt ", make_fmt(1, 2, 16_000, 16)))

    samples, _ = read_wav(write_bytes(tmp_path, data))

    assert samples.shape == (2, 2)


@pytest.mark.parametrize("data_size", [0xFFFFFFFF, 0, 0x7FFFF000], ids=["ffffffff", "zero", "sox-placeholder"])
def test_read_wav_streaming_data_size(tmp_path: Path, data_size: int) -> None:
    audio = int16_bytes([1, 2, 3, 4, 5])
    data = make_riff(
        MONO_16K_FMT, make_chunk(b"data", audio, size=data_size), riff_size=0xFFFFFFFF
    )

    samples, _ = read_wav(write_bytes(tmp_path, data))

    np.testing.assert_allclose(samples[:, 0], np.arange(1, 6) / 32768.0)


def test_read_wav_streaming_whole_frames(tmp_path: Path) -> None:
    # Two stereo 16-bit frames, then 3 bytes of a frame that the writer never finished.
    audio = int16_bytes([1, 2, 3, 4]) + b"\x05\x00\x06"
    stereo_fmt = make_chunk(b"fmt ", make_fmt(1, 2, 16_000, 16))
    data = make_riff(stereo_fmt, make_chunk(b"data", audio, size=0xFFFFFFFF, pad=False))

    samples, _ = read_wav(write_bytes(tmp_path, data))

    assert samples.shape == (2, 2)


@pytest.mark.parametrize("riff_size", [0, 0xFFFFFFFF, 36], ids=["zero", "ffffffff", "smaller-than-data"])
def test_read_wav_placeholder_riff_size(tmp_path: Path, riff_size: int) -> None:
    audio = int16_bytes([10, 20, 30])
    data = make_riff(MONO_16K_FMT, make_chunk(b"data", audio, size=1_000_000), riff_size=riff_size)

    samples, _ = read_wav(write_bytes(tmp_path, data))

    assert samples.shape == (3, 1)


def test_read_wav_rf64_from_soundfile(tmp_path: Path) -> None:
    path = tmp_path / "long.wav"
    soundfile.write(path, np.full((10, 1), 0.25), 16_000, subtype="PCM_16", format="RF64")

    samples, rate = read_wav(path)

    assert path.read_bytes()[:4] == b"RF64"
    assert rate == 16_000
    np.testing.assert_allclose(samples, 0.25, atol=1e-4)


# ---------------------------------------------------------------------------
# Errors: each message names the path and the fix


def assert_input_error(path: Path, fix: str, match: str) -> AudioInputError:
    with pytest.raises(AudioInputError) as caught:
        read_wav(path)
    message = str(caught.value)
    assert str(path) in message
    assert match.lower() in message.lower()
    assert fix.lower() in message.lower()
    assert "\n" not in message
    return caught.value


def test_error_file_not_found(tmp_path: Path) -> None:
    assert_input_error(tmp_path / "missing.wav", fix="check the path", match="not found")


def test_error_is_directory(tmp_path: Path) -> None:
    folder = tmp_path / "folder.wav"
    folder.mkdir()
    assert_input_error(folder, fix="pass the path of a .wav file", match="is a directory")


def test_error_permission_denied(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = write_bytes(tmp_path, b"RIFF")

    def deny(self: Path) -> bytes:
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(Path, "read_bytes", deny)
    assert_input_error(path, fix="chmod u+r", match="permission denied")


@pytest.mark.skipif(not hasattr(os, "geteuid") or os.geteuid() == 0, reason="root can read any file")
def test_error_permission_denied_real_file(tmp_path: Path) -> None:
    path = write_bytes(tmp_path, make_riff(MONO_16K_FMT, make_chunk(b"data", b"\0\0")))
    path.chmod(0)
    assert_input_error(path, fix="chmod u+r", match="permission denied")


def test_error_empty_file(tmp_path: Path) -> None:
    assert_input_error(write_bytes(tmp_path, b""), fix="record or export the audio again", match="empty (0 bytes)")


def test_error_mp3_from_soundfile(tmp_path: Path) -> None:
    path = tmp_path / "speech.mp3"
    soundfile.write(path, sine(440, 16_000, 0.5), 16_000, format="MP3")
    error = assert_input_error(path, fix="ffmpeg -i", match="not a WAV file")
    assert "MP3" in str(error)
    assert "sox" in str(error)
    assert "PCM or float WAV" in str(error)


def test_error_flac_from_soundfile(tmp_path: Path) -> None:
    path = tmp_path / "speech.flac"
    soundfile.write(path, sine(440, 16_000, 0.1), 16_000, format="FLAC")
    error = assert_input_error(path, fix="ffmpeg -i", match="not a WAV file")
    assert "FLAC" in str(error)


@pytest.mark.parametrize(
    ("content", "kind"),
    [
        (b"ID3\x04\x00\x00\x00\x00\x00\x00" + bytes(100), "MP3"),
        (b"hello, this is a text file\n", "text file"),
        (bytes(range(200, 256)) * 4, "binary"),
        (b"RIFF\x10\x00\x00\x00AVI LIST", "'AVI '"),
        (b"OggS" + bytes(60), "Ogg"),
        (b"RI", "text file"),
    ],
    ids=["id3-mp3", "text", "random-bytes", "riff-avi", "ogg", "two-bytes"],
)
def test_error_not_a_wav(tmp_path: Path, content: bytes, kind: str) -> None:
    error = assert_input_error(write_bytes(tmp_path, content, "input.wav"), fix="ffmpeg -i", match="not a WAV file")
    assert kind in str(error)


def test_error_riff_header_truncated(tmp_path: Path) -> None:
    assert_input_error(write_bytes(tmp_path, b"RIFF\x24\x00"), fix="export it again", match="truncated")


def test_error_missing_fmt_chunk(tmp_path: Path) -> None:
    data = make_riff(make_chunk(b"data", int16_bytes([1, 2])))
    assert_input_error(write_bytes(tmp_path, data), fix="export the recording again", match="missing its fmt chunk")


def test_error_missing_data_chunk(tmp_path: Path) -> None:
    data = make_riff(MONO_16K_FMT, make_chunk(b"LIST", b"INFO"))
    assert_input_error(write_bytes(tmp_path, data), fix="export the recording again", match="missing its data chunk")


def test_error_header_only(tmp_path: Path) -> None:
    path = write_bytes(tmp_path, make_riff())
    assert_input_error(path, fix="export the recording again", match="missing its fmt chunk")


def test_error_fmt_chunk_too_short(tmp_path: Path) -> None:
    data = make_riff(make_chunk(b"fmt ", b"\x01\x00\x01\x00"), make_chunk(b"data", b"\0\0"))
    assert_input_error(write_bytes(tmp_path, data), fix="export the recording again", match="header is invalid")


def test_error_fmt_chunk_cut_off(tmp_path: Path) -> None:
    data = make_riff(MONO_16K_FMT)[:30]
    assert_input_error(write_bytes(tmp_path, data), fix="export it again", match="truncated")


def test_error_extensible_fmt_too_short(tmp_path: Path) -> None:
    data = make_riff(make_chunk(b"fmt ", make_fmt(0xFFFE, 1, 16_000, 16)), make_chunk(b"data", b"\0\0"))
    assert_input_error(write_bytes(tmp_path, data), fix="export the recording again", match="WAVE_FORMAT_EXTENSIBLE")


@pytest.mark.parametrize(
    ("subtype", "tag"),
    [("ULAW", "0x0007 (mu-law)"), ("ALAW", "0x0006 (A-law)"), ("IMA_ADPCM", "0x0011"), ("MS_ADPCM", "0x0002")],
)
def test_error_unsupported_encoding_soundfile(tmp_path: Path, subtype: str, tag: str) -> None:
    path = tmp_path / "coded.wav"
    soundfile.write(path, sine(440, 8_000, 0.2), 8_000, subtype=subtype, format="WAV")
    error = assert_input_error(path, fix="pcm_s16le", match="unsupported WAV encoding")
    assert tag in str(error)


@pytest.mark.parametrize(("format_tag", "name"), [(0x0055, "MP3"), (0x1234, "unknown encoding")])
def test_error_unsupported_encoding_tag(tmp_path: Path, format_tag: int, name: str) -> None:
    data = make_riff(make_chunk(b"fmt ", make_fmt(format_tag, 1, 16_000, 16)), make_chunk(b"data", b"\0\0"))
    error = assert_input_error(write_bytes(tmp_path, data), fix="convert it first", match="unsupported WAV encoding")
    assert f"0x{format_tag:04X} ({name})" in str(error)


def test_error_unsupported_extensible_sub_format(tmp_path: Path) -> None:
    data = make_riff(make_chunk(b"fmt ", make_fmt(0xFFFE, 1, 16_000, 8, sub_format=7)), make_chunk(b"data", b"\0\0"))
    error = assert_input_error(write_bytes(tmp_path, data), fix="convert it first", match="unsupported WAV encoding")
    assert "mu-law" in str(error)


@pytest.mark.parametrize(
    ("format_tag", "bits", "kind"),
    [(1, 4, "4-bit PCM"), (1, 0, "0-bit PCM"), (1, 48, "48-bit PCM"), (3, 16, "16-bit float"), (3, 24, "24-bit float")],
)
def test_error_unsupported_bit_depth(tmp_path: Path, format_tag: int, bits: int, kind: str) -> None:
    data = make_riff(make_chunk(b"fmt ", make_fmt(format_tag, 1, 16_000, bits)), make_chunk(b"data", bytes(12)))
    error = assert_input_error(write_bytes(tmp_path, data), fix="convert it first", match="unsupported WAV bit depth")
    assert kind in str(error)


def test_error_zero_channels(tmp_path: Path) -> None:
    data = make_riff(make_chunk(b"fmt ", make_fmt(1, 0, 16_000, 16)), make_chunk(b"data", b"\0\0"))
    assert_input_error(write_bytes(tmp_path, data), fix="export the recording again", match="0 channels")


def test_error_zero_sample_rate(tmp_path: Path) -> None:
    data = make_riff(make_chunk(b"fmt ", make_fmt(1, 1, 0, 16)), make_chunk(b"data", b"\0\0"))
    assert_input_error(write_bytes(tmp_path, data), fix="export the recording again", match="sample rate of 0 Hz")


def test_error_truncated_data(tmp_path: Path) -> None:
    path = tmp_path / "cut.wav"
    with wave.open(str(path), "wb") as output:
        output.setnchannels(1)
        output.setsampwidth(2)
        output.setframerate(16_000)
        output.writeframes(bytes(2000))
    complete = path.read_bytes()
    path.write_bytes(complete[: len(complete) - 500])

    error = assert_input_error(path, fix="copy, download or export the file again", match="truncated")

    assert "declares 2000 bytes" in str(error)
    assert "only 1500" in str(error)


def test_error_truncated_by_one_byte(tmp_path: Path) -> None:
    data = make_riff(MONO_16K_FMT, make_chunk(b"data", int16_bytes([1, 2, 3])))
    assert_input_error(write_bytes(tmp_path, data[:-1]), fix="export the file again", match="truncated")


def test_error_contains_no_audio(tmp_path: Path) -> None:
    path = tmp_path / "silent.wav"
    with wave.open(str(path), "wb") as output:
        output.setnchannels(1)
        output.setsampwidth(2)
        output.setframerate(16_000)
        output.writeframes(b"")

    assert_input_error(path, fix="record or export the audio again", match="contains no audio")


def test_error_empty_data_followed_by_chunk(tmp_path: Path) -> None:
    data = make_riff(MONO_16K_FMT, make_chunk(b"data", b""), make_chunk(b"LIST", b"INFO"))
    assert_input_error(write_bytes(tmp_path, data), fix="record or export the audio again", match="contains no audio")


def test_error_less_than_one_frame(tmp_path: Path) -> None:
    data = make_riff(make_chunk(b"fmt ", make_fmt(1, 2, 16_000, 16)), make_chunk(b"data", b"\0\0"))
    assert_input_error(write_bytes(tmp_path, data), fix="record or export the audio again", match="contains no audio")


def test_error_is_voice_error(tmp_path: Path) -> None:
    with pytest.raises(VoiceError):
        read_wav(tmp_path / "missing.wav")


# ---------------------------------------------------------------------------
# Mixdown, resampling and load_speech


def test_to_mono_averages_channels() -> None:
    stereo = np.array([[1.0, 0.0], [0.5, -0.5], [-1.0, -1.0]], dtype=np.float32)

    mono = to_mono(stereo)

    assert mono.dtype == np.float32
    assert mono.shape == (3,)
    np.testing.assert_allclose(mono, [0.5, 0.0, -1.0])


def test_to_mono_single_channel_and_1d() -> None:
    column = np.array([[0.1], [0.2]], dtype=np.float64)

    assert to_mono(column).shape == (2,)
    assert to_mono(column).dtype == np.float32
    np.testing.assert_allclose(to_mono(np.array([0.3, 0.4])), [0.3, 0.4], rtol=1e-6)


def test_to_mono_rejects_3d() -> None:
    with pytest.raises(ValueError, match="shape"):
        to_mono(np.zeros((2, 2, 2)))


@pytest.mark.parametrize("from_rate", [44_100, 48_000, 8_000, 22_050])
def test_resample_keeps_frequency_and_length(from_rate: int) -> None:
    tone = sine(440, from_rate, 1.0)

    output = resample(tone, from_rate, SPEECH_SAMPLE_RATE)

    assert output.dtype == np.float32
    assert output.ndim == 1
    assert abs(len(output) - SPEECH_SAMPLE_RATE) <= 0.01 * SPEECH_SAMPLE_RATE
    assert abs(peak_frequency(output, SPEECH_SAMPLE_RATE) - 440) <= 2
    # Amplitude survives: the RMS of a 0.5 sine is 0.5 / sqrt(2).
    assert abs(np.sqrt(np.mean(output[1000:-1000] ** 2)) - 0.5 / np.sqrt(2)) < 0.01


def test_resample_identity_when_rates_match() -> None:
    samples = np.array([0.1, -0.2, 0.3], dtype=np.float64)

    output = resample(samples, 16_000, 16_000)

    assert output.dtype == np.float32
    np.testing.assert_allclose(output, samples, rtol=1e-6)


def test_resample_empty_input() -> None:
    assert resample(np.zeros(0, dtype=np.float32), 44_100, 16_000).shape == (0,)


@pytest.mark.parametrize(("from_rate", "to_rate"), [(0, 16_000), (16_000, 0), (-8_000, 16_000)])
def test_resample_rejects_invalid_rates(from_rate: int, to_rate: int) -> None:
    with pytest.raises(ValueError, match="positive"):
        resample(np.zeros(10, dtype=np.float32), from_rate, to_rate)


def test_load_speech_stereo_48k(tmp_path: Path) -> None:
    tone = sine(440, 48_000, 0.5)
    path = tmp_path / "stereo.wav"
    soundfile.write(path, np.stack([tone, tone], axis=1), 48_000, subtype="PCM_24")

    speech = load_speech(path)

    assert speech.dtype == np.float32
    assert speech.ndim == 1
    assert abs(len(speech) - 8_000) <= 80
    assert abs(peak_frequency(speech, SPEECH_SAMPLE_RATE) - 440) <= 4


def test_load_speech_16k_mono_unchanged(tmp_path: Path) -> None:
    path = tmp_path / "mono.wav"
    data = make_riff(MONO_16K_FMT, make_chunk(b"data", int16_bytes([0, 16384, -16384])))
    path.write_bytes(data)

    np.testing.assert_allclose(load_speech(path), [0.0, 0.5, -0.5])


# ---------------------------------------------------------------------------
# ReplyWavWriter and write_wav


def folder_entries(folder: Path) -> list[str]:
    return sorted(entry.name for entry in folder.iterdir())


def test_writer_chunks_readable(tmp_path: Path) -> None:
    path = tmp_path / "reply.wav"

    with ReplyWavWriter(path, 22_050) as writer:
        for _ in range(5):
            writer.write(sine(440, 22_050, 0.1))
        assert writer.frames_written == 5 * 2205
        assert writer.duration_s == pytest.approx(0.5)

    samples, rate = read_wav(path)
    assert rate == 22_050
    assert samples.shape == (5 * 2205, 1)
    with wave.open(str(path), "rb") as check:
        assert check.getnframes() == 5 * 2205
        assert check.getsampwidth() == 2
        assert check.getnchannels() == 1
    assert folder_entries(tmp_path) == ["reply.wav"]


def test_writer_temp_file_grows_before_commit(tmp_path: Path) -> None:
    path = tmp_path / "reply.wav"
    writer = ReplyWavWriter(path, 16_000)

    writer.write(np.zeros(16_000, dtype=np.float32))
    size_after_first = writer.temp_path.stat().st_size
    writer.write(np.zeros(16_000, dtype=np.float32))

    assert writer.temp_path.parent == tmp_path
    assert writer.temp_path.name.startswith(".reply.wav.")
    assert writer.temp_path.name.endswith(".partial")
    assert size_after_first >= 32_000
    assert writer.temp_path.stat().st_size >= 64_000
    assert not path.exists()
    writer.commit()
    assert path.exists()
    assert not writer.temp_path.exists()


@pytest.mark.parametrize(
    "error_type", [RuntimeError, KeyboardInterrupt, asyncio.CancelledError], ids=["error", "ctrl-c", "cancelled"]
)
def test_writer_exception_leaves_nothing(tmp_path: Path, error_type: type[BaseException]) -> None:
    path = tmp_path / "reply.wav"

    with pytest.raises(error_type):
        with ReplyWavWriter(path, 16_000) as writer:
            writer.write(np.ones(1000, dtype=np.float32) * 0.1)
            raise error_type()

    assert not path.exists()
    assert folder_entries(tmp_path) == []


def test_writer_exception_keeps_previous_file(tmp_path: Path) -> None:
    path = tmp_path / "reply.wav"
    path.write_bytes(b"previous reply")

    with pytest.raises(RuntimeError):
        with ReplyWavWriter(path, 16_000) as writer:
            writer.write(np.zeros(100, dtype=np.float32))
            raise RuntimeError("synthesis failed")

    assert path.read_bytes() == b"previous reply"
    assert folder_entries(tmp_path) == ["reply.wav"]


def test_writer_commit_replaces_existing_file(tmp_path: Path) -> None:
    path = tmp_path / "reply.wav"
    write_wav(path, np.full(100, 0.5, dtype=np.float32), 16_000)
    inode_before = path.stat().st_ino

    with ReplyWavWriter(path, 16_000) as writer:
        writer.write(np.full(300, -0.5, dtype=np.float32))
        # Until commit the old reply stays complete at the final path.
        assert read_wav(path)[0].shape == (100, 1)

    samples, _ = read_wav(path)
    assert samples.shape == (300, 1)
    np.testing.assert_allclose(samples, -0.5, atol=1e-4)
    assert path.stat().st_ino != inode_before
    assert folder_entries(tmp_path) == ["reply.wav"]


def test_writer_clips_and_scales_float(tmp_path: Path) -> None:
    path = tmp_path / "clip.wav"

    write_wav(path, np.array([2.0, -2.0, 1.0, -1.0, 0.5, 0.0, np.nan], dtype=np.float32), 16_000)

    with wave.open(str(path), "rb") as check:
        values = np.frombuffer(check.readframes(7), dtype="<i2")
    np.testing.assert_array_equal(values, [32767, -32767, 32767, -32767, 16384, 0, 0])


def test_writer_int16_passthrough(tmp_path: Path) -> None:
    path = tmp_path / "int.wav"
    original = np.array([-32768, -1, 0, 1, 32767], dtype=np.int16)

    write_wav(path, original, 8_000)

    with wave.open(str(path), "rb") as check:
        np.testing.assert_array_equal(np.frombuffer(check.readframes(5), dtype="<i2"), original)


def test_writer_accepts_column_vector(tmp_path: Path) -> None:
    path = write_wav(tmp_path / "column.wav", np.zeros((50, 1), dtype=np.float32), 16_000)
    assert read_wav(path)[0].shape == (50, 1)


@pytest.mark.parametrize(
    ("samples", "error_type"),
    [(np.zeros((10, 2), dtype=np.float32), ValueError), (np.zeros(10, dtype=np.int32), TypeError)],
    ids=["stereo", "int32"],
)
def test_writer_rejects_invalid_samples(tmp_path: Path, samples: np.ndarray, error_type: type[Exception]) -> None:
    with pytest.raises(error_type):
        write_wav(tmp_path / "bad.wav", samples, 16_000)
    assert folder_entries(tmp_path) == []


def test_writer_missing_folder(tmp_path: Path) -> None:
    folder = tmp_path / "no-such-folder"

    with pytest.raises(AudioInputError) as caught:
        ReplyWavWriter(folder / "reply.wav", 16_000)

    assert str(caught.value) == (
        f"Output folder does not exist: {folder}. Create it or choose another path for --output."
    )


def test_output_check_names_request_field(tmp_path: Path) -> None:
    blocker = tmp_path / "file.txt"
    blocker.write_text("x")
    setting = "the request's 'output'"

    for path in (tmp_path / "no-such-folder" / "reply.wav", blocker / "reply.wav"):
        with pytest.raises(AudioInputError) as caught:
            check_output_path(path, setting=setting)
        assert str(caught.value).endswith(f"another path for {setting}."), str(caught.value)


def test_writer_path_is_directory(tmp_path: Path) -> None:
    folder = tmp_path / "replies"
    folder.mkdir()

    with pytest.raises(AudioInputError) as caught:
        ReplyWavWriter(folder, 16_000)

    assert str(folder) in str(caught.value)
    assert "--output" in str(caught.value)
    assert folder_entries(tmp_path) == ["replies"]


def test_writer_rejects_zero_rate(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="sample_rate"):
        ReplyWavWriter(tmp_path / "reply.wav", 0)


def test_writer_write_after_commit(tmp_path: Path) -> None:
    writer = ReplyWavWriter(tmp_path / "reply.wav", 16_000)
    writer.write(np.zeros(10, dtype=np.float32))
    writer.commit()

    with pytest.raises(ValueError, match="already committed or discarded"):
        writer.write(np.zeros(10, dtype=np.float32))


def test_writer_discard_then_commit(tmp_path: Path) -> None:
    writer = ReplyWavWriter(tmp_path / "reply.wav", 16_000)
    writer.discard()
    writer.discard()

    with pytest.raises(ValueError, match="discarded"):
        writer.commit()
    assert folder_entries(tmp_path) == []


def test_writer_commit_twice_returns_path(tmp_path: Path) -> None:
    writer = ReplyWavWriter(tmp_path / "reply.wav", 16_000)
    writer.write(np.zeros(10, dtype=np.float32))

    assert writer.commit() == tmp_path / "reply.wav"
    assert writer.commit() == tmp_path / "reply.wav"


def test_writer_dropped_without_commit(tmp_path: Path) -> None:
    writer = ReplyWavWriter(tmp_path / "reply.wav", 16_000)
    writer.write(np.zeros(10, dtype=np.float32))

    del writer

    assert folder_entries(tmp_path) == []


def test_writer_permissions_follow_umask(tmp_path: Path) -> None:
    previous = os.umask(0o022)
    try:
        path = write_wav(tmp_path / "reply.wav", np.zeros(10, dtype=np.float32), 16_000)
    finally:
        os.umask(previous)

    assert path.stat().st_mode & 0o777 == 0o644


def test_write_wav_empty_reply(tmp_path: Path) -> None:
    path = write_wav(tmp_path / "empty.wav", np.zeros(0, dtype=np.float32), 16_000)

    with wave.open(str(path), "rb") as check:
        assert check.getnframes() == 0
