"""Live mode: turns from a real-time replay of the fixtures, barge-in, the echo gate, the wake phrase."""

from __future__ import annotations

import asyncio
import time

import numpy as np
import pytest

from tests.conftest import FIXTURES
from voice.audio.sinks import PacedSink
from voice.audio.sources import ReplaySource
from voice.audio.wav import load_speech
from voice.config import ListenConfig
from voice.live import LiveLoop, _EchoGate, wake_phrase_filter
from voice.pipeline import TurnEvents


class RoomSpeaker(PacedSink):
    """A speaker in a room: plays in real time and sends its own sound back into the microphone.

    Stands in for the sound card CI lacks, behind the same PacedSink code path as the
    real speaker. ``echo`` is the level at which the microphone hears it.
    """

    def __init__(self, source: ReplaySource | None = None, echo: float = 0.0, on_piece=None) -> None:
        super().__init__()
        self.source = source
        self.echo = echo
        self.on_piece = on_piece
        self.pieces: list[np.ndarray] = []

    def _play(self, piece: np.ndarray) -> None:
        self.pieces.append(piece)
        if self.source is not None and self.echo:
            # Piper runs at 22050 Hz; the microphone stream is 16 kHz.
            from voice.audio.wav import resample

            self.source.inject(resample(piece, self.sample_rate, 16_000) * self.echo)
        if self.on_piece:
            self.on_piece(self)
        time.sleep(len(piece) / self.sample_rate)

    @property
    def seconds(self) -> float:
        return sum(len(piece) for piece in self.pieces) / self.sample_rate


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("Computer, what time is it?", "what time is it?"),
        ("computer what time is it", "what time is it"),
        ("  COMPUTER. Turn on the lights.", "Turn on the lights."),
        ("What time is it, computer?", None),
        ("Computers are great.", None),
        ("Computer.", None),
    ],
)
def test_wake_phrase_filter(text, expected):
    assert wake_phrase_filter("Computer")(text) == expected


def test_wake_phrase_of_several_words():
    accept = wake_phrase_filter("hey voice")
    assert accept("Hey, Voice! How far is the moon?") == "How far is the moon?"
    assert accept("Hey how far is the moon?") is None


def test_echo_gate_learns_the_echo_level():
    gate = _EchoGate(margin=3.0)
    for _ in range(50):
        gate.observe_echo(0.02, 0.1)  # the reply comes back at a fifth of its level
        gate.observe_echo(0.0, 0.1)  # and the microphone is silent in the pauses
    assert gate.coupling == pytest.approx(0.2)
    assert not gate.is_user(0.03, 0.1)  # a little louder than the echo: still echo
    assert gate.is_user(0.08, 0.1)  # four times the echo: a person
    assert not gate.is_user(0.001, None)  # too quiet to be anyone


def listen_config(**changes) -> ListenConfig:
    return ListenConfig(**changes)


@pytest.mark.slow
def test_two_questions_answered_and_noise_ignored(assistant):
    assistant.llm.new_conversation()
    source = ReplaySource(
        [
            (0.5, FIXTURES / "en_piper_romeo_juliet_author.wav"),
            (8.0, FIXTURES / "nonspeech_gen_clicks_coughs.wav"),
            (1.0, FIXTURES / "en_espeak_time_now.wav"),
            (10.0, None),
        ]
    )
    loop = LiveLoop(assistant, listen_config(), source, RoomSpeaker)
    turns = asyncio.run(loop.run())
    answered = [turn for turn in turns if turn.result is not None and turn.result.answer]
    assert len(answered) == 2
    assert "shakespeare" in answered[0].result.answer.lower()
    assert "time" in answered[1].result.transcript.text.lower()
    metrics = answered[0].result.metrics
    # Both turns started at a pause. Speech recognition may finish before the endpoint,
    # but no audio plays before it.
    assert loop.early_starts >= 2
    assert 0 < metrics.asr_ms < metrics.first_token_ms < metrics.first_audio_ms
    assert 0 < metrics.endpoint_ms <= metrics.first_audio_ms
    # The clicks and coughs gave no answer (they may give no turn at all, or a turn
    # that speech recognition rejects).
    assert all(turn.result.transcript.has_speech for turn in answered)


@pytest.mark.slow
def test_speech_after_a_pause_drops_the_early_start(assistant):
    assistant.llm.new_conversation()
    transcripts: list[str] = []

    class Transcripts(TurnEvents):
        def on_transcript(self, transcript) -> None:
            transcripts.append(transcript.text)

    # About 1 s of silence between the two questions: a pause, not the end of the turn.
    source = ReplaySource(
        [(0.5, FIXTURES / "en_piper_romeo_juliet_author.wav"), (0.2, FIXTURES / "en_piper_followup_when_born.wav"), (10.0, None)]
    )
    speakers: list[RoomSpeaker] = []

    def make_speaker() -> RoomSpeaker:
        speakers.append(RoomSpeaker())
        return speakers[-1]

    loop = LiveLoop(assistant, listen_config(silence_ms=1500, early_start_ms=300), source, make_speaker, Transcripts())
    turns = asyncio.run(loop.run())
    assert len(turns) == 1
    assert loop.early_starts == 2
    assert loop.dropped_starts == 1
    # The first early start heard only the first question. It played nothing and left
    # neither a transcript on screen nor an exchange in the history.
    assert sum(len(speaker.pieces) > 0 for speaker in speakers) == 1
    assert len(transcripts) == 1
    transcript = turns[0].result.transcript.text.lower()
    assert "romeo" in transcript
    assert "born" in transcript
    history = assistant.llm.conversation.history
    assert len(history) == 1
    assert history[0].user == turns[0].result.transcript.text
    metrics = turns[0].result.metrics
    assert metrics.endpoint_ms >= 1500 - 60
    assert metrics.first_audio_ms >= metrics.endpoint_ms


@pytest.mark.slow
def test_user_speech_over_the_reply_stops_it(assistant):
    assistant.llm.new_conversation()
    stop = load_speech(FIXTURES / "en_piper_stop_loud.wav")
    source = ReplaySource([(0.5, FIXTURES / "en_piper_boil_egg_pinknoise.wav"), (40.0, None)])
    interrupted: list[RoomSpeaker] = []

    def interrupt(speaker: RoomSpeaker) -> None:
        # One second into the first reply, the user says "stop".
        if not interrupted and len(speaker.pieces) == 20:
            interrupted.append(speaker)
            source.inject(stop)

    def make_speaker() -> RoomSpeaker:
        return RoomSpeaker(source, echo=0.1, on_piece=interrupt)

    loop = LiveLoop(assistant, listen_config(), source, make_speaker)
    turns = asyncio.run(loop.run(max_turns=3))
    first = next(turn for turn in turns if turn.result is None or turn.result.answer)
    assert first.interrupted
    assert first.barge_in_ms < 200
    assert interrupted[0].seconds < 3.0  # the egg answer runs well past ten seconds
    # The question was kept; its answer is only what was heard before the cut.
    egg = next(exchange for exchange in assistant.llm.conversation.history if exchange.user.lower().startswith("how do i boil"))
    assert egg.assistant == first.spoken
    assert len(first.spoken) < 80
    # The interruption itself was answered as the next turn.
    following = turns[turns.index(first) + 1]
    assert following.result is not None
    assert "stop" in following.result.transcript.text.lower()


@pytest.mark.slow
def test_own_voice_echo_neither_interrupts_nor_gets_answered(assistant):
    assistant.llm.new_conversation()
    source = ReplaySource([(0.5, FIXTURES / "en_piper_romeo_juliet_author.wav"), (12.0, None)])
    loop = LiveLoop(assistant, listen_config(), source, lambda: RoomSpeaker(source, echo=0.5))
    turns = asyncio.run(loop.run())
    assert len(turns) == 1
    assert not turns[0].interrupted
    assert "shakespeare" in turns[0].result.answer.lower()


@pytest.mark.slow
def test_live_loop_answers_through_a_real_device(assistant, pulse_device):
    from voice.audio.sinks import SpeakerSink
    from voice.audio.sources import MicrophoneSource

    assistant.llm.new_conversation()
    question = load_speech(FIXTURES / "en_piper_twelve_times_eight.wav")
    # The assistant's reply goes to the same sink, so the microphone hears it at full
    # level: the echo gate must keep it from interrupting or being answered.
    loop = LiveLoop(assistant, listen_config(), MicrophoneSource(pulse_device), lambda: SpeakerSink(pulse_device))

    async def session():
        async def user_speaks():
            await asyncio.sleep(1.0)
            mouth = SpeakerSink(pulse_device)
            await mouth.open(16_000)
            await mouth.write(question)
            await mouth.close(True)

        speaking = asyncio.create_task(user_speaks())
        turns = await asyncio.wait_for(loop.run(max_turns=1), 120)
        await speaking
        return turns

    turns = asyncio.run(session())
    assert len(turns) == 1
    assert not turns[0].interrupted
    answer = turns[0].result.answer.lower()
    assert "ninety" in answer or "96" in answer
    assert turns[0].result.metrics.first_audio_ms is not None
