"""Command line: ``voice respond``, ``chat``, ``listen``, ``say``, ``mqtt``, ``prepare``, ``devices`` and ``bench``.

Front ends only pick an input, an output and options; the turn itself runs in
``voice.pipeline``. User mistakes end in one line on stderr and a non-zero exit code.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import logging
import os
import signal
import sys
from pathlib import Path

from voice.bench import ALL_MODES, REDUCED_VOCAB_MODES, WEIGHT_FORMATS
from voice.config import Config, load_config
from voice.errors import AudioInputError, ConfigError, VoiceError

logger = logging.getLogger("voice")

# Exit code of ``voice respond`` when the recording contains no speech: not a failure of
# the program, but a caller waiting for a reply file must learn that none will come.
EXIT_NO_SPEECH = 6
EXIT_INTERRUPTED = 130
EXIT_TERMINATED = 143


class Terminated(KeyboardInterrupt):
    """Raised in the main thread on SIGTERM, so it unwinds like Ctrl-C: a partial reply is discarded."""


def _raise_terminated(signal_number: int, frame) -> None:
    raise Terminated()


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("voice")
    except PackageNotFoundError:  # run from a source tree that was never installed
        return "unknown (not installed)"


def build_parser() -> argparse.ArgumentParser:
    # The global options are accepted before and after the command name; SUPPRESS keeps
    # a value given before the command from being reset by the command's default.
    options = argparse.ArgumentParser(add_help=False)
    options.add_argument("--config", metavar="PATH", default=argparse.SUPPRESS, help="configuration file (default: ./config.yaml if present, else built-in defaults)")
    options.add_argument("-v", "--verbose", action="store_true", default=argparse.SUPPRESS, help="log DEBUG messages")

    parser = argparse.ArgumentParser(prog="voice", parents=[options], description="Offline voice assistant with a speculative-decoding language model.")
    parser.add_argument("--version", action="version", version=f"voice {_version()}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def add_command(name: str, summary: str, description: str) -> argparse.ArgumentParser:
        return commands.add_parser(name, parents=[options], help=summary, description=description)

    respond = add_command(
        "respond",
        "answer a spoken question from a WAV file",
        "Transcribe QUESTION.wav, answer it, and speak the answer to REPLY.wav or the speaker. "
        "Exits with 6 and writes nothing when the recording contains no speech.",
    )
    respond.add_argument("input", metavar="QUESTION.wav", help="recording of the question: PCM or float WAV, any sample rate and channel count")
    respond.add_argument("-o", "--output", metavar="REPLY.wav", help="write the spoken answer here (default: play it on the speaker)")
    respond.add_argument("--no-speculation", action="store_true", help="decode with the target model alone, for comparison")

    chat = add_command(
        "chat",
        "answer typed questions; one question per line, Ctrl-D ends",
        "Read questions from standard input, one per line, and stream each answer as text. "
        "The conversation is kept, so follow-up questions work.",
    )
    chat.add_argument("--speak", action="store_true", help="also speak each answer on the speaker")
    chat.add_argument("--no-speculation", action="store_true", help="decode with the target model alone, for comparison")

    listen = add_command(
        "listen",
        "hands-free: listen on the microphone and answer out loud, turn after turn",
        "Listen on the microphone, end each turn at a pause, and speak the answer as soon as it is ready. "
        "Speaking over an answer interrupts it (listen.barge_in). Ctrl-C ends the session.",
    )
    listen.add_argument("--no-speculation", action="store_true", help="decode with the target model alone, for comparison")
    listen.add_argument(
        "--replay", nargs="+", metavar="WAV", help="instead of the microphone, play these recordings into the loop in real time, each 1.5 s after the reply to the one before (for demos and tests)"
    )
    listen.add_argument(
        "--output-dir",
        metavar="DIR",
        help="write each reply to DIR/reply-001.wav, reply-002.wav ... at the pace of playback instead of playing it (for machines without a speaker)",
    )

    say = add_command("say", "speak TEXT with the configured piper voice", "Speak TEXT with the configured piper voice, chunk by chunk.")
    say.add_argument("text", metavar="TEXT", help="text to speak; markdown, URLs and emoji are removed first")
    say.add_argument("-o", "--output", metavar="OUT.wav", help="write the audio here (default: play it on the speaker)")

    add_command(
        "prepare",
        "assemble, verify and convert the configured models into the cache, then exit",
        "Assemble, verify and convert every configured model into the cache, so the first answer starts fast.",
    )
    add_command(
        "mqtt",
        "serve questions from an MQTT broker (Hermes topics, Home Assistant discovery)",
        "Connect to the broker in config.yaml (mqtt section) and answer requests until stopped. "
        "SIGINT or SIGTERM stops after the current turn; a second one cancels it. Topics: docs/mqtt.md.",
    )
    add_command("devices", "list sound devices with their default sample rates", "List sound devices with their default sample rates.")

    bench = add_command("bench", "measure the pipeline's speed", "Benchmarks that print a table and write JSON and PNG reports.")
    benchmarks = bench.add_subparsers(dest="benchmark", required=True, metavar="BENCHMARK")
    llm = benchmarks.add_parser(
        "llm",
        parents=[options],
        help="compare plain decoding, each drafter and transformers on a fixed prompt set",
        description="Decode a fixed set of spoken-assistant prompts with plain decoding, our speculative decoder "
        "(each drafter) and transformers' assisted generation, interleaved in one run, and write "
        "bench-llm.json and bench-llm.png.",
    )
    llm.add_argument("--prompts", type=int, metavar="N", help="use N prompts spread over the categories (default: all)")
    llm.add_argument("--max-new-tokens", type=int, default=64, metavar="N", help="token limit per answer (default: 64)")
    llm.add_argument("--modes", metavar="LIST", help="comma-separated modes (default: all): " + ", ".join(ALL_MODES))
    llm.add_argument(
        "--draft-vocab", type=int, metavar="N",
        help="output tokens of the draft-int8-vocab and draft-int4-vocab modes (default: llm.draft_vocab, or 32768 where that is 0)",
    )
    llm.add_argument(
        "--weights",
        default="dense,int8,int4",
        metavar="LIST",
        help="target weight formats, each run alone and with the draft (default: dense,int8,int4)",
    )
    llm.add_argument(
        "--llama-cpp",
        metavar="DIR",
        help="folder with llama.cpp's llama-completion and llama-speculative-simple (default: look on PATH; none found skips them)",
    )
    llm.add_argument("--output-dir", default=".", metavar="DIR", help="folder for bench-llm.json and bench-llm.png (default: .)")
    spoken = benchmarks.add_parser(
        "voice",
        parents=[options],
        help="time whole spoken turns, speculation on and off, from the end of speech to the last audio",
        description="Answer every spoken fixture through the whole pipeline with speculation on and off, interleaved in "
        "one process after a warm-up turn. Prints the median and 95th percentile of every stage and writes "
        "bench-voice.json, bench-voice.md and two PNG charts.",
    )
    spoken.add_argument("--fixtures", default="audio_fixtures", metavar="DIR", help="folder with MANIFEST.tsv and the WAV files (default: audio_fixtures)")
    spoken.add_argument("--limit", type=int, metavar="N", help="use only the first N spoken fixtures")
    spoken.add_argument("--output-dir", default=".", metavar="DIR", help="folder for the reports (default: .)")
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
    from voice.audio.wav import is_same_file, load_speech

    # Read and check the input and the output before importing torch or loading any
    # model, so a typo fails in a second rather than after a minute.
    audio = load_speech(args.input)
    if args.output and is_same_file(args.input, args.output):
        raise AudioInputError(
            f"--output {args.output} is the input recording {args.input}, so the reply would overwrite the question. "
            "Choose another --output path."
        )
    sink = _output_sink(args.output, "or write to a file with --output")
    # Silence and noise are rejected by webrtcvad alone, before the models load.
    from voice.asr.recognizer import check_speech

    _voiced_ms, rejected = check_speech(audio, config.asr)
    if rejected is not None:
        return _report_no_speech(args.input, rejected.reason)

    from voice.pipeline import load_assistant

    speculative = False if args.no_speculation else None
    assistant = await load_assistant(config, speculative=speculative)
    # One question and then exit: a prefill for a next turn would only delay the exit.
    assistant.prepare_next_turn = False
    result = await assistant.respond_to_audio(audio, sink, _PrintingEvents(show_transcript=True), speculative)
    if not result.transcript.has_speech:
        return _report_no_speech(args.input, result.transcript.reason)
    print(f"Timing: {result.metrics.summary()}", flush=True)
    if args.output:
        print(f"Reply: {args.output} ({result.metrics.audio_s:.1f} s of audio)", flush=True)
    return 0


def _report_no_speech(path: str, reason: str) -> int:
    print(
        f"No speech detected in {path}, so nothing was answered: {reason}. "
        "If it does contain a question, record it louder or closer to the microphone.",
        file=sys.stderr,
    )
    return EXIT_NO_SPEECH


def _output_sink(output: str | None, speaker_hint: str):
    """Return the sink for ``--output`` (a WAV file) or the speaker, after checking it can work."""
    from voice.audio.sinks import SpeakerSink, WavFileSink
    from voice.audio.wav import check_output_path

    if output is None:
        sink = SpeakerSink(hint=speaker_hint)
        sink.check()
        return sink
    check_output_path(output, probe_write=True)
    if not output.lower().endswith(".wav"):
        raise AudioInputError(
            f"--output {output} does not end in .wav, but the audio is written as a WAV file. Give a name such as reply.wav."
        )
    return WavFileSink(output)


async def _chat(config: Config, args: argparse.Namespace) -> int:
    from voice.audio.sinks import SpeakerSink
    from voice.pipeline import load_assistant

    speculative = False if args.no_speculation else None
    if args.speak:
        SpeakerSink(hint="or run voice chat without --speak").check()
    assistant = await load_assistant(config, need_asr=False, need_tts=args.speak, speculative=speculative)
    events = _PrintingEvents(show_transcript=False)
    interactive = sys.stdin.isatty()
    # Lines are read as bytes and decoded here, because the text stream either raises on
    # invalid bytes or, with surrogateescape (the default under the C locale), passes them
    # on as lone surrogates, which the tokenizer rejects.
    encoding = (sys.stdin.encoding or "utf-8").upper()
    line_number = 0
    while True:
        if interactive:
            print("> ", end="", flush=True)
        raw_line = await asyncio.to_thread(sys.stdin.buffer.readline)
        if not raw_line:
            return 0
        line_number += 1
        try:
            line = raw_line.decode(encoding)
        except UnicodeDecodeError as error:
            print(
                f"error: line {line_number} of standard input is not valid {encoding} (byte {raw_line[error.start]:#04x} at position {error.start}), "
                f"so it was skipped; type the question again as {encoding} text",
                file=sys.stderr,
                flush=True,
            )
            continue
        question = line.strip()
        if not question:
            continue
        sink = SpeakerSink(hint="or run voice chat without --speak") if args.speak else None
        result = await assistant.respond_to_text(question, sink, events, speculative)
        print(f"Timing: {result.metrics.summary()}", flush=True)


async def _say(config: Config, args: argparse.Namespace) -> int:
    import time

    from voice import models
    from voice.tts.synthesizer import Synthesizer, speak
    from voice.tts.text import SpeechChunker

    chunker = SpeechChunker.from_config(config.tts, streamed=False)
    if not chunker.push(args.text) + chunker.flush():
        raise ConfigError(f"Nothing to say: TEXT {args.text!r} has no speakable words. Pass the words to speak, for example: voice say \"Good morning\"")
    sink = _output_sink(args.output, "or write to a file with --output")
    voice_path = await asyncio.to_thread(models.resolve_piper, config.tts.voice, models.cache_root(config.cache_dir))
    synthesizer = await asyncio.to_thread(Synthesizer, voice_path, config.tts)
    started = time.perf_counter()
    seconds = await speak(synthesizer, config.tts, args.text, sink)
    print(f"Spoke {seconds:.1f} s of audio in {time.perf_counter() - started:.2f} s" + (f" to {args.output}" if args.output else ""))
    return 0


async def _prepare(config: Config, args: argparse.Namespace) -> int:
    from voice import models

    cache = models.cache_root(config.cache_dir)
    # A file damaged since it was built (a full disk, a copy cut short) is found here
    # and its model built again by the steps below.
    for spec in (config.llm.target, config.llm.draft, config.asr.model, config.tts.voice):
        problem = await asyncio.to_thread(models.verify_prepared, spec, cache)
        if problem:
            print(f"{spec}: {problem}; building it again", flush=True)
    steps = [
        ("target", config.llm.target, lambda: models.resolve_llm(config.llm.target, cache, config.allow_download, "llm.target")),
        ("draft", config.llm.draft, lambda: models.resolve_llm(config.llm.draft, cache, config.allow_download, "llm.draft")),
        ("speech recognition", config.asr.model, lambda: models.resolve_whisper(config.asr.model, cache, config.allow_download)),
        ("voice", config.tts.voice, lambda: models.resolve_piper(config.tts.voice, cache)),
    ]
    locations = {}
    for role, spec, resolve in steps:
        location = await asyncio.to_thread(resolve)
        locations[role] = location
        print(f"{role}: {spec} -> {location[0] if isinstance(location, tuple) else location}", flush=True)
    if config.llm.drafter == "model" and config.llm.draft_vocab:
        from voice.llm.loading import draft_vocabulary, load_tokenizer

        target, is_hub = locations["target"]
        tokenizer = await asyncio.to_thread(load_tokenizer, target, is_hub, config.allow_download)
        ids = await asyncio.to_thread(draft_vocabulary, config.llm, tokenizer, config.llm.draft_vocab, cache)
        print(f"draft vocabulary: {len(ids)} most frequent tokens", flush=True)
    from voice.llm.loading import apply_weights, load_models, pack_draft_weights, resolve_draft_weights, resolve_dtype, resolve_target_weights

    # Packing quantized weights takes about a minute the first time; doing it here keeps
    # the first `voice listen` or `voice mqtt` start fast.
    dtype = resolve_dtype(config.llm.dtype)
    weights = resolve_target_weights(config.llm.target_weights, dtype)
    if weights != "dense":
        loaded = await asyncio.to_thread(load_models, locations["target"], None, dtype, config.allow_download)
        source = locations["target"][0]
        await asyncio.to_thread(apply_weights, loaded.target_model, weights, config.llm.target, source, cache, "target")
        print(f"target weights: {weights}, packed in {cache / 'packed'}", flush=True)
        del loaded  # before the draft loads: a float32 target takes about 6 GB
    draft_weights = resolve_draft_weights(config.llm.draft_weights)
    if config.llm.speculative and config.llm.drafter == "model" and draft_weights == "int4":
        await asyncio.to_thread(pack_draft_weights, config.llm, locations["draft"], dtype, config.allow_download, cache)
        print(f"draft weights: {draft_weights}, packed in {cache / 'packed'}", flush=True)
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


async def _bench(config: Config, args: argparse.Namespace) -> int:
    if args.benchmark == "voice":
        return await _bench_voice(config, args)
    modes = args.modes.split(",") if args.modes else list(ALL_MODES)
    unknown = [mode for mode in modes if mode not in ALL_MODES]
    if unknown:
        raise ConfigError(f"--modes: unknown mode {unknown[0]!r}; choose from {', '.join(ALL_MODES)}")
    if args.prompts is not None and args.prompts < 1:
        raise ConfigError(f"--prompts must be at least 1, got {args.prompts}")
    if not 1 <= args.max_new_tokens <= 4096:
        raise ConfigError(f"--max-new-tokens must be from 1 to 4096, got {args.max_new_tokens}")
    weights = tuple(args.weights.split(","))
    bad = [name for name in weights if name not in WEIGHT_FORMATS]
    if bad or not weights:
        raise ConfigError(f"--weights: unknown format {bad[0] if bad else args.weights!r}; choose from {', '.join(WEIGHT_FORMATS)}")
    if args.llama_cpp and not Path(args.llama_cpp).expanduser().is_dir():
        raise ConfigError(f"--llama-cpp: {args.llama_cpp} is not a folder; give the folder that contains llama-completion")
    output_dir = Path(args.output_dir)
    if output_dir.exists() and not output_dir.is_dir():
        raise AudioInputError(f"--output-dir: {output_dir} is a file; name a folder")

    from voice import models
    from voice.bench import llamacpp
    from voice.bench import llm as bench_llm
    from voice.llm.loading import draft_vocabulary, load_models, resolve_dtype

    cache = models.cache_root(config.cache_dir)
    quantized = any(name != "dense" for name in weights)
    needs_draft = quantized or any(mode in ("draft", *REDUCED_VOCAB_MODES, "transformers-assisted") for mode in modes)
    target = await asyncio.to_thread(models.resolve_llm, config.llm.target, cache, config.allow_download, "llm.target")
    draft = await asyncio.to_thread(models.resolve_llm, config.llm.draft, cache, config.allow_download, "llm.draft") if needs_draft else None
    dtype = resolve_dtype(config.llm.dtype)
    loaded = await asyncio.to_thread(load_models, target, draft, dtype, config.allow_download)
    vocab_ids = None
    if any(mode in REDUCED_VOCAB_MODES for mode in modes) or (quantized and config.llm.draft_vocab):
        size = args.draft_vocab or config.llm.draft_vocab or 32768
        vocab_ids = await asyncio.to_thread(draft_vocabulary, config.llm, loaded.tokenizer, size, cache)
    llamacpp_setup = None
    programs = llamacpp.find_programs(args.llama_cpp)
    target_gguf = models.embedded_gguf(config.llm.target, cache) if programs else None
    if programs and target_gguf is None:
        print(f"Skipping llama.cpp: llm.target {config.llm.target!r} is not an embedded GGUF model", flush=True)
    elif programs:
        llamacpp_setup = (programs, target_gguf, models.embedded_gguf(config.llm.draft, cache))
    elif args.llama_cpp:
        raise ConfigError(f"--llama-cpp: {args.llama_cpp} contains neither llama-completion nor llama-speculative-simple; give llama.cpp's build/bin folder")
    if config.llm.threads:
        import torch

        torch.set_num_threads(config.llm.threads)
    prompts = bench_llm.select_prompts(args.prompts)
    print(f"Benchmarking {len(prompts)} prompts in {len(modes)} modes, interleaved ({', '.join(modes)})", flush=True)
    # Runs in this thread: the benchmark is the only work, and torch's thread setting
    # above applies to the thread that set it.
    report = bench_llm.run_benchmark(
        loaded, config, modes, prompts, args.max_new_tokens, vocab_ids, weights=weights, cache=cache, llamacpp_setup=llamacpp_setup
    )
    json_path, png_path = bench_llm.write_report(report, output_dir)
    print(bench_llm.format_table(report))
    print(
        f"Best: {report['best_mode']}, {report['speedup_vs_plain'] or 0:.2f}x plain, "
        f"{report['speedup_vs_transformers'] or 0:.2f}x transformers assisted; identical greedy output: "
        f"{report['identical_greedy'] or 0:.0%}"
    )
    if report["tokens_per_s_best"]:
        llama_line = f", llama.cpp best {report['tokens_per_s_llamacpp']:.2f} ({report['best_llamacpp']})" if report["tokens_per_s_llamacpp"] else ""
        print(f"Fastest of ours: {report['best_configuration']} at {report['tokens_per_s_best']:.2f} tok/s{llama_line}")
    print(f"Wrote {json_path} and {png_path}")
    return 0


async def _listen(config: Config, args: argparse.Namespace) -> int:
    from voice.audio.sinks import PacedSink, PacedWavSink, SpeakerSink
    from voice.audio.sources import MicrophoneSource, ReplaySource, device_setting
    from voice.audio.wav import check_output_path, read_wav

    settings = config.listen
    if args.replay:
        for path in args.replay:
            read_wav(path)  # a bad file fails now, not after the models load
        # Each recording after the first waits for the reply to the one before it.
        source = ReplaySource([(1.5, path) for path in args.replay] + [(3.0, None)], idle=lambda: loop.idle)
    else:
        source = MicrophoneSource(settings.input_device)
        source.check()
    speaker_hint = "or set listen.output_device, or write the replies to files with --output-dir"
    output = device_setting(settings.output_device)
    if args.output_dir:
        check_output_path(Path(args.output_dir) / "reply-001.wav", probe_write=True, setting="--output-dir")
        replies = itertools.count(1)

        def make_sink() -> PacedSink:
            return PacedWavSink(Path(args.output_dir) / f"reply-{next(replies):03d}.wav")

    else:
        SpeakerSink(output, hint=speaker_hint).check()

        def make_sink() -> PacedSink:
            return SpeakerSink(output, hint=speaker_hint)

    from voice.live import LiveLoop
    from voice.pipeline import load_assistant

    speculative = False if args.no_speculation else None
    assistant = await load_assistant(config, speculative=speculative)
    print("Listening. Speak a question; Ctrl-C ends." + (f" Start with {settings.wake_phrase!r}." if settings.wake_phrase else ""), flush=True)
    loop = LiveLoop(assistant, settings, source, make_sink, _PrintingEvents(show_transcript=True))
    await loop.run()
    return 0


async def _bench_voice(config: Config, args: argparse.Namespace) -> int:
    import tempfile

    from voice.bench import voice as bench_voice

    if args.limit is not None and args.limit < 1:
        raise ConfigError(f"--limit must be at least 1, got {args.limit}")
    folder = Path(args.fixtures)
    fixtures = bench_voice.read_manifest(folder)[: args.limit]
    missing = [fixture.file for fixture in fixtures if not (folder / fixture.file).is_file()]
    if missing:
        raise AudioInputError(f"{folder / missing[0]} is listed in MANIFEST.tsv but missing; restore it or fix the manifest")
    if not fixtures:
        raise AudioInputError(f"{folder / 'MANIFEST.tsv'} lists no spoken fixtures (kinds {', '.join(bench_voice.SPOKEN_KINDS)})")
    output_dir = Path(args.output_dir)
    if output_dir.exists() and not output_dir.is_dir():
        raise AudioInputError(f"--output-dir: {output_dir} is a file; name a folder")

    from voice.pipeline import load_assistant

    assistant = await load_assistant(config, speculative=True)
    if not assistant.llm.can_speculate:
        raise ConfigError("voice bench voice compares speculation on and off; set llm.speculative: true")
    print(f"Benchmarking {len(fixtures)} spoken fixtures, speculation on and off, interleaved", flush=True)
    settings = bench_voice.settings_of(config)
    command = "voice bench voice" + (f" --limit {args.limit}" if args.limit else "")
    with tempfile.TemporaryDirectory() as replies:
        progress = bench_voice.progress_bar(2 * len(fixtures))
        # The per-turn INFO lines would break up the progress bar; the report has every turn.
        turn_logger = logging.getLogger("voice.pipeline")
        level = turn_logger.level
        turn_logger.setLevel(logging.WARNING)
        try:
            turns = await bench_voice.run_voice_benchmark(assistant, folder, fixtures, Path(replies), progress)
        finally:
            turn_logger.setLevel(level)
    report = bench_voice.build_report(turns, settings, command)
    paths = bench_voice.write_report(report, turns, output_dir)
    print(bench_voice.format_table(report))
    print(
        f"First audio with speculation: p50 {report['first_audio_ms_p50'] or 0:.0f} ms, p95 {report['first_audio_ms_p95'] or 0:.0f} ms; "
        f"{report['first_audio_speedup'] or 0:.2f}x sooner than without; word error rate {report['wer'] or 0:.1%}"
    )
    print("Wrote " + ", ".join(str(path) for path in paths if path.exists()))
    return 0


async def _mqtt(config: Config, args: argparse.Namespace) -> int:
    from voice.audio.sinks import SpeakerSink
    from voice.mqtt.service import MqttService
    from voice.pipeline import load_assistant

    if config.mqtt.speaker:
        SpeakerSink(hint="or set mqtt.speaker: false in config.yaml to answer with text and WAV files only").check()
    assistant = await load_assistant(config)
    service = MqttService(assistant, config)
    loop = asyncio.get_running_loop()
    for number in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(number, service.stop)
    try:
        await service.run()
    finally:
        for number in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(number)
            if service.stopping:
                # Stopped on request: a signal that arrives while the process exits repeats
                # a request already being carried out, so it must not turn exit code 0 into 143.
                signal.signal(number, signal.SIG_IGN)
    return 0


async def _run(config: Config, args: argparse.Namespace) -> int:
    handlers = {"respond": _respond, "chat": _chat, "listen": _listen, "say": _say, "prepare": _prepare, "bench": _bench, "mqtt": _mqtt}
    return await handlers[args.command](config, args)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    signal.signal(signal.SIGTERM, _raise_terminated)
    try:
        config = _find_config(getattr(args, "config", None))
        _setup_logging(config, getattr(args, "verbose", False))
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
    except Terminated:
        print("Terminated.", file=sys.stderr)
        return EXIT_TERMINATED
    except KeyboardInterrupt:
        print("Interrupted.", file=sys.stderr)
        return EXIT_INTERRUPTED


if __name__ == "__main__":
    sys.exit(main())
