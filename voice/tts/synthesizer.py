"""Speech synthesis with piper: text in, 16-bit-ready float audio chunks out."""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from voice.config import TtsConfig
from voice.errors import ModelError, first_line
from voice.tts.text import SpeechChunker, ends_mid_sentence

logger = logging.getLogger(__name__)

# Piper ends every utterance with about 150 to 210 ms of silence and starts it with about
# 50 ms. Between two chunks of one sentence (a phrase cut, or a long sentence split at a
# space) that makes a pause no speaker would make, so those edges are cut down to these
# margins of quiet audio.
JOIN_TRAILING_S = 0.04
JOIN_LEADING_S = 0.02
# Samples below this fraction of full scale count as silence when edges are cut.
SILENCE_LEVEL = 0.01


def trim_silence(samples: np.ndarray, sample_rate: int, leading: bool, trailing: bool) -> np.ndarray:
    """Cut the silence at the start (``leading``) and at the end (``trailing``) down to the join margins."""
    loud = np.flatnonzero(np.abs(samples) > SILENCE_LEVEL)
    if loud.size == 0:
        return samples
    start = max(0, int(loud[0]) - int(JOIN_LEADING_S * sample_rate)) if leading else 0
    end = min(len(samples), int(loud[-1]) + 1 + int(JOIN_TRAILING_S * sample_rate)) if trailing else len(samples)
    return samples[start:end]


class Synthesizer:
    """One piper voice, loaded once; ``synthesize`` is blocking, so call it from a worker thread."""

    def __init__(self, voice_path: Path, config: TtsConfig) -> None:
        import onnxruntime
        from piper import PiperVoice, SynthesisConfig
        from piper.config import PiperConfig

        started = time.monotonic()
        try:
            voice_config = PiperConfig.from_dict(json.loads(Path(f"{voice_path}.json").read_text(encoding="utf-8")))
        except (OSError, ValueError, KeyError) as error:
            raise ModelError(f"Piper voice config {voice_path}.json is unreadable ({error}): reinstall the voice") from None
        options = onnxruntime.SessionOptions()
        # piper runs while the language model decodes; a thread cap keeps the two from
        # fighting over the same cores.
        options.intra_op_num_threads = config.threads
        options.inter_op_num_threads = 1
        try:
            session = onnxruntime.InferenceSession(str(voice_path), sess_options=options, providers=["CPUExecutionProvider"])
        except Exception as error:  # onnxruntime raises its own classes for unreadable models
            raise ModelError(
                f"Piper voice {voice_path} failed to load ({first_line(error)}): "
                "run voice prepare to check the cached models and rebuild damaged ones, or reinstall the voice"
            ) from None
        self.voice = PiperVoice(session=session, config=voice_config)
        self.sample_rate: int = voice_config.sample_rate
        self.synthesis_config = SynthesisConfig(length_scale=config.length_scale, volume=config.volume)
        logger.info("Loaded piper voice %s in %.1f s", voice_path.name, time.monotonic() - started)

    def synthesize(self, text: str) -> Iterator[np.ndarray]:
        """Yield float32 mono audio in [-1, 1] at ``sample_rate``, one array per sentence."""
        for chunk in self.voice.synthesize(text, self.synthesis_config):
            yield chunk.audio_float_array

    def synthesize_all(self, text: str) -> list[np.ndarray]:
        """Return every audio chunk of ``text``, so one worker-thread call does the whole chunk."""
        return list(self.synthesize(text))

    def synthesize_joined(self, text: str, previous: str | None) -> list[np.ndarray]:
        """Return the audio of ``text`` as ``synthesize_all`` does, with silent edges cut where a sentence goes on.

        ``previous`` is the chunk spoken just before ``text`` (None for the first). When it
        stopped inside a sentence, the leading silence of ``text`` is cut. When ``text``
        stops inside a sentence, its trailing silence is cut.
        """
        pieces = self.synthesize_all(text)
        if pieces and previous is not None and ends_mid_sentence(previous):
            pieces[0] = trim_silence(pieces[0], self.sample_rate, leading=True, trailing=False)
        if pieces and ends_mid_sentence(text):
            pieces[-1] = trim_silence(pieces[-1], self.sample_rate, leading=False, trailing=True)
        return pieces


async def speak(synthesizer: Synthesizer, config: TtsConfig, text: str, sink) -> float:
    """Speak ``text`` as it is into ``sink`` (an AudioSink), chunk by chunk; return the seconds of audio.

    The chunker cuts long text at sentences and clauses (at most ``max_chunk_chars``), so
    piper's memory stays bounded and the audio is written as each chunk is ready. A
    failure closes the sink with ``ok=False``, which discards a partial file.
    """
    chunker = SpeechChunker.from_config(config, streamed=False)
    chunks = chunker.push(text) + chunker.flush()
    seconds = 0.0
    await sink.open(synthesizer.sample_rate)
    ok = False
    try:
        for previous, chunk in zip([None, *chunks], chunks):
            for samples in await asyncio.to_thread(synthesizer.synthesize_joined, chunk, previous):
                await sink.write(samples)
                seconds += len(samples) / synthesizer.sample_rate
        ok = True
    finally:
        await sink.close(ok)
    return seconds
