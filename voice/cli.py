"""Command line: ``voice respond``, ``voice chat``, ``voice say``, ``voice prepare``, ``voice devices``.

Front ends only pick an input, an output and options; the turn itself runs in
``voice.pipeline``. User mistakes end in one line on stderr and a non-zero exit code.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import sys
from pathlib import Path

from voice.config import Config, load_config
from voice.errors import VoiceError

logger = logging.getLogger("voice")

# Exit code of ``voice respond`` when the recording contains no speech: not a failure of
# the program, but a caller waiting for a reply file must learn that none will come.
EXIT_NO_SPEECH = 6
EXIT_INTERRUPTED = 130


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="voice", description="Offline voice assistant with a speculative-decoding language model.")
    parser.add_argument("--config", metavar="PATH", help="configuration file (default: ./config.yaml if present, else built-in defaults)")
    parser.add_argument("-v", "--verbose", action="store_true", help="log DEBUG messages")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    respond = commands.add_parser("respond", help="answer a spoken question from a WAV file")
    respond.add_argument("input", metavar="QUESTION.wav", help="recording of the question: PCM or float WAV, any rate, mono or stereo")
    respond.add_argument("-o", "--output", metavar="REPLY.wav", help="write the spoken answer here (default: play it on the speaker)")
    respond.add_argument("--no-speculation", action="store_true", help="decode with the target model alone, for comparison")

    chat = commands.add_parser("chat", help="answer typed questions; one question per line, Ctrl-D ends")
    chat.add_argument("--speak", action="store_true", help="also speak each answer on the speaker")
    chat.add_argument("--no-speculation", action="store_true", help="decode with the target model alone, for comparison")

    say = commands.add_parser("say", help="speak TEXT with the configured piper voice")
    say.add_argument("text", metavar="TEXT")
    say.add_argument("-o", "--output", metavar="OUT.wav", help="write the audio here (default: play it on the speaker)")

    commands.add_parser("prepare", help="assemble, verify and convert the configured models into the cache, then exit")
    commands.add_parser("devices", help="list sound devices with their default sample rates")
    return parser


def _find_config(path: str | None) -> Config:
    if path is not None:
        return load_config(path)
    default = Path("config.yaml")
    return load_config(default) if default.is_file() else Config()


def _setup_logging(config: Config, verbose: bool) -> None:
    level = logging.DEBUG if verbose else getattr(logging, config.log_level)
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S", stream=sys.stderr)
    # Third-party INFO lines (per-file VAD notes, progress bars) drown the one line per turn.
    for name in ("faster_whisper", "transformers", "httpx", "huggingface_hub"):
        logging.getLogger(name).setLevel(max(level, logging.WARNING))


class _PrintingEvents:
    """Prints the transcript and the answer as it streams."""

    def __init__(self, show_transcript: bool) -> None:
        self.show_transcript = show_transcript

    def on_transcript(self, transcript) -> None:
        if self.show_transcript and transcript.has_speech:
            print(f"You: {transcript.text}", flush=True)

    def on_text(self, fragment: str) -> None:
        if not getattr(self, "_started", False):
            self._started = True
            print("Assistant: ", end="", flush=True)
        print(fragment, end="", flush=True)

    def on_answer_end(self) -> None:
        if getattr(self, "_started", False):
            print(flush=True)
        self._started = False


async def _respond(config: Config, args: argparse.Namespace) -> int:
    from voice.audio.sinks import SpeakerSink, WavFileSink
    from voice.audio.wav import load_speech

    # Read and check the input (and the output folder) before importing torch or loading
    # any model, so a typo fails in a second rather than after a minute.
    audio = load_speech(args.input)
    sink = WavFileSink(args.output) if args.output else SpeakerSink()
    if args.output:
        _check_output_path(Path(args.output))

    from voice.pipeline import load_assistant

    speculative = False if args.no_speculation else None
    assistant = await load_assistant(config, speculative=speculative)
    result = await assistant.respond_to_audio(audio, sink, _PrintingEvents(show_transcript=True), speculative)
    if not result.transcript.has_speech:
        print(f"No speech detected in {args.input} ({result.transcript.reason}); no answer given.", file=sys.stderr)
        return EXIT_NO_SPEECH
    print(f"Timing: {result.metrics.summary()}", flush=True)
    if args.output:
        print(f"Reply: {args.output} ({result.metrics.audio_s:.1f} s of audio)", flush=True)
    return 0


def _check_output_path(path: Path) -> None:
    from voice.errors import AudioInputError

    if path.is_dir():
        raise AudioInputError(f"Output path {path} is a folder: give a file name such as {path / 'reply.wav'}")
    if not path.parent.resolve().is_dir():
        raise AudioInputError(f"Output folder {path.parent} does not exist: create it or choose another --output path")


async def _chat(config: Config, args: argparse.Namespace) -> int:
    from voice.audio.sinks import SpeakerSink
    from voice.pipeline import load_assistant

    speculative = False if args.no_speculation else None
    assistant = await load_assistant(config, need_asr=False, need_tts=args.speak, speculative=speculative)
    events = _PrintingEvents(show_transcript=False)
    interactive = sys.stdin.isatty()
    while True:
        if interactive:
            print("> ", end="", flush=True)
        line = await asyncio.to_thread(sys.stdin.readline)
        if not line:
            return 0
        question = line.strip()
        if not question:
            continue
        sink = SpeakerSink() if args.speak else None
        result = await assistant.respond_to_text(question, sink, events, speculative)
        print(f"Timing: {result.metrics.summary()}", flush=True)


async def _say(config: Config, args: argparse.Namespace) -> int:
    import time

    from voice import models
    from voice.audio.sinks import SpeakerSink, WavFileSink
    from voice.tts.synthesizer import Synthesizer
    from voice.tts.text import clean_for_speech

    text = clean_for_speech(args.text)
    if not text:
        raise VoiceError(f"Nothing to say: {args.text!r} has no speakable words")
    if args.output:
        _check_output_path(Path(args.output))
    voice_path = await asyncio.to_thread(models.resolve_piper, config.tts.voice, models.cache_root(config.cache_dir))
    synthesizer = await asyncio.to_thread(Synthesizer, voice_path, config.tts)
    sink = WavFileSink(args.output) if args.output else SpeakerSink()
    started = time.perf_counter()
    await sink.open(synthesizer.sample_rate)
    ok = False
    seconds = 0.0
    try:
        for samples in await asyncio.to_thread(lambda: list(synthesizer.synthesize(text))):
            await sink.write(samples)
            seconds += len(samples) / synthesizer.sample_rate
        ok = True
    finally:
        await sink.close(ok)
    print(f"Spoke {seconds:.1f} s of audio in {time.perf_counter() - started:.2f} s" + (f" to {args.output}" if args.output else ""))
    return 0


async def _prepare(config: Config, args: argparse.Namespace) -> int:
    from voice import models

    cache = models.cache_root(config.cache_dir)
    steps = [
        ("target", models.resolve_llm, config.llm.target),
        ("draft", models.resolve_llm, config.llm.draft),
        ("speech recognition", models.resolve_whisper, config.asr.model),
        ("voice", models.resolve_piper, config.tts.voice),
    ]
    for role, resolve, spec in steps:
        location = await asyncio.to_thread(resolve, spec, cache)
        print(f"{role}: {spec} -> {location[0] if isinstance(location, tuple) else location}", flush=True)
    return 0


def _devices() -> int:
    from voice.errors import AudioDeviceError

    try:
        import sounddevice
    except OSError as error:
        raise AudioDeviceError(f"Cannot list sound devices: {error}. Install PortAudio (apt-get install libportaudio2)") from None
    devices = sounddevice.query_devices()
    if not len(devices):
        print("No sound devices found.")
        return 0
    for index, device in enumerate(devices):
        kinds = []
        if device["max_input_channels"]:
            kinds.append(f"input {device['max_input_channels']} ch")
        if device["max_output_channels"]:
            kinds.append(f"output {device['max_output_channels']} ch")
        print(f"{index:3d}  {device['name']}  ({', '.join(kinds)}, default {device['default_samplerate']:.0f} Hz)")
    return 0


async def _run(config: Config, args: argparse.Namespace) -> int:
    handlers = {"respond": _respond, "chat": _chat, "say": _say, "prepare": _prepare}
    return await handlers[args.command](config, args)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        config = _find_config(args.config)
        _setup_logging(config, args.verbose)
        if not config.allow_download:
            # Keeps transformers and huggingface_hub from reaching for the network.
            os.environ.setdefault("HF_HUB_OFFLINE", "1")
        # Per-tensor progress bars of model loading would bury the transcript and answer.
        os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
        os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
        if args.command == "devices":
            return _devices()
        return asyncio.run(_run(config, args))
    except VoiceError as error:
        print(f"error: {error}", file=sys.stderr)
        return error.exit_code
    except KeyboardInterrupt:
        print("Interrupted.", file=sys.stderr)
        return EXIT_INTERRUPTED


if __name__ == "__main__":
    sys.exit(main())
