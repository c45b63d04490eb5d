"""Read any PCM or float WAV file as float samples, and write spoken replies as 16-bit WAV."""

from __future__ import annotations

import logging
import os
import secrets
import shlex
import struct
import tempfile
import wave
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import BinaryIO

import numpy as np
import soxr

from voice.errors import AudioInputError

logger = logging.getLogger(__name__)

# Sample rate in Hz that the speech recognizer expects.
SPEECH_SAMPLE_RATE = 16_000

WAVE_FORMAT_PCM = 0x0001
WAVE_FORMAT_IEEE_FLOAT = 0x0003
WAVE_FORMAT_EXTENSIBLE = 0xFFFE

# Format tags that users meet in practice, named in the "unsupported encoding" error.
_FORMAT_NAMES = {
    0x0002: "Microsoft ADPCM", 0x0006: "A-law", 0x0007: "mu-law", 0x0011: "IMA ADPCM", 0x0031: "GSM 6.10",
    0x0040: "G.721 ADPCM", 0x0050: "MPEG audio", 0x0055: "MP3", 0x0161: "Windows Media Audio", 0x1610: "AAC",
}  # fmt: skip
# File signatures (offset, bytes) of formats that users pass by mistake, named in the "not a WAV file" error.
_OTHER_FORMATS = [
    (0, b"ID3", "an MP3 file"),
    (0, b"fLaC", "a FLAC file"),
    (0, b"OggS", "an Ogg file (Vorbis or Opus)"),
    (4, b"ftyp", "an MP4 or M4A file"),
    (0, b"FORM", "an AIFF file"),
    (0, b"\x1aE\xdf\xa3", "a WebM or Matroska file"),
    (0, b"RIFX", "a big-endian RIFX file, which is not supported"),
]

# Data chunk sizes that streaming writers put in the header when they cannot seek back. The audio
# then runs to the end of file. FFmpeg writes 0xFFFFFFFF (0 in older releases, libavformat/riffenc.c),
# and SoX writes 0x7FFFF000 (MS_UNSPEC in src/wav.c).
_STREAMING_DATA_SIZES = {0, 0xFFFFFFFF, 0x7FFFF000}
_PLACEHOLDER_RIFF_SIZES = {0, 0xFFFFFFFF}


def _convert_hint(path: Path) -> str:
    quoted = shlex.quote(str(path))
    return (
        f"convert it first, for example `ffmpeg -i {quoted} -c:a pcm_s16le out.wav` "
        f"or `sox {quoted} -e signed -b 16 out.wav`"
    )


def _describe_non_wav(header: bytes) -> str:
    """Guess the file type from its first bytes, for the "not a WAV file" message."""
    for offset, signature, description in _OTHER_FORMATS:
        if header[offset : offset + len(signature)] == signature:
            return description
    # An MP3 file without an ID3 tag starts with an 11-bit frame sync.
    if len(header) >= 2 and header[0] == 0xFF and header[1] & 0xE0 == 0xE0:
        return "an MP3 file"
    if header.startswith(b"RIFF"):
        form = header[8:12].decode("latin-1")
        return f"a RIFF file of type {form!r}, not 'WAVE'"
    try:
        text = header.decode("utf-8")
    except UnicodeDecodeError:
        return "unknown binary data"
    if all(char.isprintable() or char.isspace() for char in text):
        return "a text file"
    return "unknown binary data"


def _read_file_bytes(path: Path) -> bytes:
    """Read the whole file into memory (fine for recordings of minutes), with a fix in every error."""
    try:
        if path.is_dir():
            raise AudioInputError(f"Input path is a directory, not a WAV file: {path}. Pass the path of a .wav file.")
        data = path.read_bytes()
    except FileNotFoundError:
        raise AudioInputError(f"Input file not found: {path}. Check the path and the current directory.") from None
    except PermissionError:
        raise AudioInputError(
            f"Input file cannot be read (permission denied): {path}. "
            f"Grant read access, for example `chmod u+r {shlex.quote(str(path))}`."
        ) from None
    except OSError as error:
        raise AudioInputError(
            f"Input file cannot be read: {path} ({error.strerror}). Check the disk and the path."
        ) from None

    if not data:
        raise AudioInputError(f"Input file is empty (0 bytes): {path}. Record or export the audio again.")
    return data


def _looks_like_chunk_header(data: bytes, offset: int) -> bool:
    """Return whether a plausible chunk header (ASCII id, size within the file) starts at offset."""
    if offset + 8 > len(data):
        return False
    chunk_id = data[offset : offset + 4]
    if not all(32 <= byte < 127 for byte in chunk_id):
        return False
    (size,) = struct.unpack_from("<I", data, offset + 4)
    return offset + 8 + size <= len(data)


def _parse_fmt(path: Path, body: bytes) -> tuple[int, int, int, int, int]:
    """Parse a fmt chunk into (format tag, channels, sample rate, block align, bits per sample)."""
    if len(body) < 16:
        raise AudioInputError(
            f"WAV header is invalid: {path} has a fmt chunk of {len(body)} bytes (at least 16 expected). "
            "Export the recording again."
        )
    format_tag, channels, sample_rate, _byte_rate, block_align, bits = struct.unpack_from("<HHIIHH", body, 0)

    if format_tag == WAVE_FORMAT_EXTENSIBLE:
        if len(body) < 40:
            raise AudioInputError(
                f"WAV header is invalid: {path} declares WAVE_FORMAT_EXTENSIBLE but its fmt chunk has "
                f"{len(body)} bytes (40 expected). Export the recording again."
            )
        # The first two bytes of the sub-format GUID carry the real format tag (PCM or float).
        (format_tag,) = struct.unpack_from("<H", body, 24)
    return format_tag, channels, sample_rate, block_align, bits


def _decode_samples(data: bytes, offset: int, frames: int, channels: int, format_tag: int, width: int) -> np.ndarray:
    """Convert little-endian sample bytes to float32 in [-1, 1] of shape (frames, channels)."""
    count = frames * channels
    if format_tag == WAVE_FORMAT_IEEE_FLOAT:
        dtype = "<f4" if width == 4 else "<f8"
        samples = np.frombuffer(data, dtype=dtype, count=count, offset=offset).astype(np.float32)
        # Float WAVs may hold values past full scale, NaN or infinity, so bring them into range.
        samples = np.clip(np.nan_to_num(samples, nan=0.0, posinf=1.0, neginf=-1.0), -1.0, 1.0)
    elif width == 1:
        # 8-bit PCM is unsigned with silence at 128.
        raw = np.frombuffer(data, dtype=np.uint8, count=count, offset=offset)
        samples = (raw.astype(np.float32) - 128.0) / 128.0
    elif width == 2:
        raw = np.frombuffer(data, dtype="<i2", count=count, offset=offset)
        samples = raw.astype(np.float32) / 32768.0
    elif width == 3:
        raw = np.frombuffer(data, dtype=np.uint8, count=count * 3, offset=offset).reshape(-1, 3).astype(np.int32)
        values = raw[:, 0] | (raw[:, 1] << 8) | (raw[:, 2] << 16)
        values = np.where(values >= 1 << 23, values - (1 << 24), values)
        samples = values.astype(np.float32) / float(1 << 23)
    else:
        raw = np.frombuffer(data, dtype="<i4", count=count, offset=offset)
        samples = (raw.astype(np.float64) / float(1 << 31)).astype(np.float32)
    return samples.reshape(frames, channels)


@dataclass
class _ChunkLayout:
    """Positions and sizes of the chunks in a RIFF/WAVE file, as found by _walk_chunks."""

    fmt: tuple[int, int, int, int, int] | None = None
    data_offset: int | None = None
    data_size: int = 0  # -1 when the audio runs to the end of file
    riff_end: int | None = None  # None when the RIFF size is a placeholder


def _walk_chunks(path: Path, data: bytes) -> _ChunkLayout:
    """Find the fmt and data chunks, skipping chunks this reader does not use (LIST, fact, ...)."""
    layout = _ChunkLayout()
    is_rf64 = data[:4] == b"RF64"
    (riff_size,) = struct.unpack_from("<I", data, 4)
    if riff_size not in _PLACEHOLDER_RIFF_SIZES:
        layout.riff_end = riff_size + 8
    ds64_data_size: int | None = None

    offset = 12
    while offset + 8 <= len(data):
        chunk_id = data[offset : offset + 4]
        (size,) = struct.unpack_from("<I", data, offset + 4)
        body_start = offset + 8

        if chunk_id == b"ds64" and is_rf64 and size >= 24:
            # RF64 keeps the 64-bit RIFF and data sizes here and puts 0xFFFFFFFF in the 32-bit fields.
            ds64_riff_size, ds64_data_size = struct.unpack_from("<QQ", data, body_start)
            layout.riff_end = ds64_riff_size + 8
        elif chunk_id == b"fmt ":
            if body_start + size > len(data):
                raise AudioInputError(
                    f"WAV file is truncated: {path} ends inside its fmt chunk. Copy or export it again."
                )
            layout.fmt = _parse_fmt(path, data[body_start : body_start + size])
        elif chunk_id == b"data" and layout.data_offset is None:
            layout.data_offset = body_start
            layout.data_size = size
            if is_rf64 and size == 0xFFFFFFFF and ds64_data_size is not None:
                layout.data_size = ds64_data_size
            elif size in _STREAMING_DATA_SIZES and not (size == 0 and _looks_like_chunk_header(data, body_start)):
                # The audio runs to the end of file. A 0 size followed by another chunk
                # is a genuinely empty WAV instead.
                layout.data_size = -1
                break
            if body_start + layout.data_size > len(data):
                break

        # Chunks of odd size are followed by one pad byte. Some writers omit it, so
        # skip it only when the unpadded position does not already start a chunk.
        offset = body_start + size
        pad_missing = _looks_like_chunk_header(data, offset) and not _looks_like_chunk_header(data, offset + 1)
        if size % 2 == 1 and not pad_missing:
            offset += 1
    return layout


def _audio_byte_count(path: Path, layout: _ChunkLayout, file_size: int) -> int:
    """Return how many bytes of the data chunk to decode, raising when the file is truncated."""
    assert layout.data_offset is not None
    available = file_size - layout.data_offset
    if layout.data_size < 0:
        logger.debug("%s has a streaming data size, reading the %d bytes present", path, available)
        return available
    if layout.data_size <= available:
        return layout.data_size

    declared_end = layout.data_offset + layout.data_size
    if layout.riff_end is None or layout.riff_end < declared_end:
        # The RIFF size is a placeholder or contradicts the data size, so both come
        # from a writer that never went back to fill them in.
        logger.warning("%s has inconsistent chunk sizes, reading the %d bytes present", path, available)
        return available
    raise AudioInputError(
        f"WAV file is truncated: {path} declares {layout.data_size} bytes of audio but contains only "
        f"{available}. Copy, download or export the file again."
    )


def read_wav(path: str | os.PathLike[str]) -> tuple[np.ndarray, int]:
    """Read a PCM or IEEE float WAV (or RF64) file.

    Returns float32 samples in [-1, 1] of shape (frames, channels) and the sample rate in Hz.
    Raises AudioInputError with a one-line message for every file that cannot be used.
    """
    path = Path(path)
    data = _read_file_bytes(path)

    if len(data) < 12 or data[:4] not in (b"RIFF", b"RF64") or data[8:12] != b"WAVE":
        if data[:4] in (b"RIFF", b"RF64") and len(data) < 12:
            raise AudioInputError(
                f"WAV file is truncated: {path} ends inside its RIFF header. Copy or export it again."
            )
        raise AudioInputError(
            f"Input file is not a WAV file: {path} (it looks like {_describe_non_wav(data[:16])}). "
            f"This tool reads PCM or float WAV files only, so {_convert_hint(path)}."
        )

    layout = _walk_chunks(path, data)
    if layout.fmt is None:
        raise AudioInputError(
            f"WAV file is missing its fmt chunk: {path}. The header is damaged, so export the recording again."
        )
    if layout.data_offset is None:
        raise AudioInputError(
            f"WAV file is missing its data chunk: {path}. The file is damaged or truncated, "
            "so export the recording again."
        )

    format_tag, channels, sample_rate, block_align, bits = layout.fmt
    if format_tag not in (WAVE_FORMAT_PCM, WAVE_FORMAT_IEEE_FLOAT):
        name = _FORMAT_NAMES.get(format_tag, "unknown encoding")
        raise AudioInputError(
            f"Unsupported WAV encoding: {path} uses format tag 0x{format_tag:04X} ({name}). "
            f"This tool reads PCM or float WAV files only, so {_convert_hint(path)}."
        )
    if channels == 0:
        raise AudioInputError(f"WAV header is invalid: {path} declares 0 channels. Export the recording again.")
    if sample_rate == 0:
        raise AudioInputError(
            f"WAV header is invalid: {path} declares a sample rate of 0 Hz. Export the recording again."
        )

    # Samples narrower than their container (for example 20-bit in 24) are left-justified,
    # so they decode correctly as the container width.
    width = (bits + 7) // 8
    supported = bits in (32, 64) if format_tag == WAVE_FORMAT_IEEE_FLOAT else 8 <= bits <= 32
    if not supported:
        kind = "float" if format_tag == WAVE_FORMAT_IEEE_FLOAT else "PCM"
        raise AudioInputError(
            f"Unsupported WAV bit depth: {path} is {bits}-bit {kind}. "
            f"This tool reads 8, 16, 24 or 32-bit PCM and 32 or 64-bit float, so {_convert_hint(path)}."
        )
    frame_size = width * channels
    if block_align != frame_size:
        logger.warning(
            "%s declares block align %d, using %d from the bit depth and channels", path, block_align, frame_size
        )

    size = _audio_byte_count(path, layout, len(data))
    frames = size // frame_size
    if size % frame_size:
        logger.warning("%s ends with %d bytes of a partial frame, ignoring them", path, size % frame_size)
    if frames == 0:
        raise AudioInputError(f"WAV file contains no audio (0 frames): {path}. Record or export the audio again.")

    samples = _decode_samples(data, layout.data_offset, frames, channels, format_tag, width)
    logger.debug("Read %s: %d frames, %d channels, %d Hz, %d-bit", path, frames, channels, sample_rate, bits)
    return samples, sample_rate


def to_mono(samples: np.ndarray) -> np.ndarray:
    """Mix (frames, channels) samples down to 1-D float32 by averaging the channels."""
    samples = np.asarray(samples)
    if samples.ndim == 1:
        return samples.astype(np.float32)
    if samples.ndim != 2:
        raise ValueError(f"expected samples of shape (frames,) or (frames, channels), got {samples.shape}")
    return samples.mean(axis=1, dtype=np.float64).astype(np.float32)


def resample(samples: np.ndarray, from_rate: int, to_rate: int) -> np.ndarray:
    """Resample float32 audio from from_rate to to_rate (Hz) with soxr's HQ filter."""
    if from_rate <= 0 or to_rate <= 0:
        raise ValueError(f"sample rates must be positive, got {from_rate} Hz and {to_rate} Hz")
    samples = np.ascontiguousarray(samples, dtype=np.float32)
    if from_rate == to_rate:
        return samples.copy()
    return np.asarray(soxr.resample(samples, from_rate, to_rate, quality="HQ"), dtype=np.float32)


def load_speech(path: str | os.PathLike[str]) -> np.ndarray:
    """Read a WAV file as 1-D float32 mono audio at SPEECH_SAMPLE_RATE."""
    samples, sample_rate = read_wav(path)
    return resample(to_mono(samples), sample_rate, SPEECH_SAMPLE_RATE)


def is_same_file(first: str | os.PathLike[str], second: str | os.PathLike[str]) -> bool:
    """Return True when both paths exist and name one file, also through a symbolic or hard link."""
    return os.path.exists(first) and os.path.exists(second) and os.path.samefile(first, second)


def check_output_path(path: str | os.PathLike[str], probe_write: bool = False, setting: str = "--output") -> None:
    """Raise AudioInputError unless a reply can be written to ``path``.

    ``probe_write`` also creates and deletes a file in the folder, which finds a
    read-only folder before any work is done. ``setting`` names where the path came
    from in the messages (a command-line option or a request field).
    """
    if not str(path):
        raise AudioInputError(f"Output path is empty: give a file name such as reply.wav in {setting}.")
    path = Path(path)
    folder = path.parent
    if path.is_dir():
        raise AudioInputError(
            f"Output path is a directory: {path}. Choose a file name inside it for {setting}, "
            f"for example {path / 'reply.wav'}."
        )
    if folder.exists() and not folder.is_dir():
        raise AudioInputError(f"Output folder {folder} is a file, not a folder. Choose another path for {setting}.")
    if not folder.is_dir():
        raise AudioInputError(f"Output folder does not exist: {folder}. Create it or choose another path for {setting}.")
    if probe_write:
        try:
            with tempfile.NamedTemporaryFile(dir=folder, prefix=".voice-write-check."):
                pass
        except OSError as error:
            raise AudioInputError(
                f"Creating a file in the output folder {folder} failed ({error.strerror}). Choose another path for {setting}."
            ) from None


class ReplyWavWriter:
    """Writer of a 16-bit PCM mono WAV file that grows as audio chunks arrive.

    Audio goes to a hidden temporary file in the output folder, and commit() renames it
    onto the final path with os.replace, which is atomic on one filesystem. So the final
    path contains either its previous content or the complete reply, never part of one.
    As a context manager it commits on normal exit and discards on any exception,
    KeyboardInterrupt and asyncio.CancelledError included.
    """

    def __init__(self, path: str | os.PathLike[str], sample_rate: int) -> None:
        self.path = Path(path)
        if sample_rate <= 0:
            raise ValueError(f"sample_rate must be positive, got {sample_rate}")
        self.sample_rate = int(sample_rate)

        check_output_path(self.path)
        self._file = self._create_temp_file(self.path.parent)
        self._wave = wave.open(self._file, "wb")
        self._wave.setnchannels(1)
        self._wave.setsampwidth(2)
        self._wave.setframerate(self.sample_rate)
        self._frames = 0
        self._closed = False
        self._committed = False

    def _create_temp_file(self, folder: Path) -> BinaryIO:
        # os.open with mode 0o666 lets the umask set the permissions, as a plain open() would,
        # where tempfile.mkstemp would leave the reply readable by its owner only.
        for _ in range(10):
            self.temp_path = folder / f".{self.path.name}.{secrets.token_hex(4)}.partial"
            try:
                descriptor = os.open(self.temp_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
            except FileExistsError:
                continue
            except OSError as error:
                raise AudioInputError(
                    f"Creating a file in the output folder {folder} failed ({error.strerror}). "
                    "Choose another --output path or fix the folder permissions."
                ) from None
            return os.fdopen(descriptor, "wb")
        raise AudioInputError(f"Creating a temporary file in {folder} failed. Remove stale .partial files there.")

    @property
    def frames_written(self) -> int:
        """Number of frames (samples, as the file is mono) written so far."""
        return self._frames

    @property
    def duration_s(self) -> float:
        """Duration of the audio written so far, in seconds."""
        return self._frames / self.sample_rate

    def write(self, samples: np.ndarray) -> None:
        """Append mono samples: float in [-1, 1] (clipped beyond) or int16."""
        if self._closed:
            raise ValueError(f"cannot write to {self.path}: the writer is already committed or discarded")
        samples = np.asarray(samples)
        if samples.ndim == 2 and samples.shape[1] == 1:
            samples = samples[:, 0]
        if samples.ndim != 1:
            raise ValueError(f"expected mono samples of shape (frames,), got {samples.shape}")

        if samples.dtype == np.int16:
            pcm = samples
        elif np.issubdtype(samples.dtype, np.floating):
            scaled = np.clip(np.nan_to_num(samples, nan=0.0), -1.0, 1.0) * 32767.0
            pcm = np.rint(scaled).astype(np.int16)
        else:
            raise TypeError(f"expected float or int16 samples, got {samples.dtype}")

        try:
            self._wave.writeframesraw(pcm.astype("<i2", copy=False).tobytes())
            # Flushing hands each chunk to the OS, so a long reply is on disk as it is produced.
            self._file.flush()
        except OSError as error:
            raise AudioInputError(
                f"Writing the reply to {self.temp_path} failed ({error.strerror}). "
                "Free disk space or choose another --output path."
            ) from None
        self._frames += len(pcm)

    def _close(self) -> None:
        if self._closed:
            return
        self._closed = True
        try:
            # Wave_write.close() patches the RIFF and data sizes in the header.
            self._wave.close()
        finally:
            self._file.close()

    def commit(self) -> Path:
        """Finish the file and move it onto the final path, replacing any file there."""
        if self._committed:
            return self.path
        if self._closed:
            raise ValueError(f"cannot commit {self.path}: the writer was discarded")
        try:
            self._wave.close()
            self._file.flush()
            os.fsync(self._file.fileno())
            self._closed = True
            self._file.close()
            os.replace(self.temp_path, self.path)
        except OSError as error:
            self.discard()
            raise AudioInputError(
                f"Writing the reply to {self.path} failed ({error.strerror}). Choose another --output path."
            ) from None
        self._committed = True
        logger.debug("Wrote %s: %d frames, %.2f s", self.path, self._frames, self.duration_s)
        return self.path

    def discard(self) -> None:
        """Close and delete the temporary file, leaving the final path untouched."""
        if self._committed:
            return
        try:
            self._close()
        except OSError as error:
            logger.warning("Closing %s failed before deleting it: %s", self.temp_path, error)
        try:
            self.temp_path.unlink(missing_ok=True)
        except OSError as error:
            logger.warning("Deleting temporary file %s failed: %s", self.temp_path, error)

    def __enter__(self) -> ReplyWavWriter:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        if exc_type is None:
            self.commit()
        else:
            self.discard()

    def __del__(self) -> None:
        # A writer dropped without commit() or discard() would otherwise leave its .partial file behind.
        if getattr(self, "_closed", True) or getattr(self, "_committed", True):
            return
        logger.warning("Writer for %s was neither committed nor discarded, deleting %s", self.path, self.temp_path)
        self.discard()


def write_wav(path: str | os.PathLike[str], samples: np.ndarray, sample_rate: int) -> Path:
    """Write mono samples (float in [-1, 1] or int16) to a 16-bit PCM WAV file atomically."""
    with ReplyWavWriter(path, sample_rate) as writer:
        writer.write(samples)
    return writer.path
