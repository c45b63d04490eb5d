"""``voice bench voice``: every spoken fixture through the whole pipeline, speculation on and off.

Each fixture is answered twice in a row, once per mode, in alternating order, after one
warm-up turn that is not recorded. Every turn starts a new conversation (both KV caches
cut back to the prefilled system prompt, as in a running service); a follow-up question
first gets the question it follows as an untimed text turn.

Each turn runs as in live mode: the live endpointer cuts the recording (with its
pre-roll before the speech), the turn starts ``listen.early_start_ms`` after the end of
speech, and its audio is held back until ``listen.silence_ms`` after it, the endpoint.
With early start off, the turn starts at the endpoint. Times are milliseconds from the
end of speech: the end of the last 30 ms frame in which the endpointer's webrtcvad
hears speech.

    end of speech ─ pause: turn starts ─ speech recognition ─ first verified token ─ first audio ─ last audio
                    └──── endpoint (silence_ms): audio may play from here on ────┘
"""

from __future__ import annotations

import asyncio
import csv
import json
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from voice.audio.sinks import WavFileSink
from voice.audio.endpoint import Endpointer, Pause
from voice.audio.vad import SAMPLE_RATE
from voice.audio.wav import load_speech
from voice.bench.machine import PACKAGES, machine_description
from voice.bench.wer import word_error_rate, word_errors
from voice.config import Config, ListenConfig
from voice.errors import AudioInputError
from voice.pipeline import Hold

SPOKEN_KINDS = ("question", "command", "followup", "speech")
# The endpointer's turn end while it cuts a fixture: longer than any pause in one.
_NEVER_MS = 5000

# (field, label, unit) of every figure in the table, in pipeline order.
FIGURES = [
    ("endpoint_ms", "endpoint (listen.silence_ms)", "ms"),
    ("asr_ms", "transcript ready", "ms"),
    ("first_token_ms", "first verified token", "ms"),
    ("first_audio_ms", "first audio", "ms"),
    ("total_ms", "last audio", "ms"),
    ("tokens_per_s", "tokens per second", "tok/s"),
    ("acceptance_rate", "acceptance rate", ""),
    ("mean_accepted", "accepted drafts per step", ""),
]


@dataclass
class Fixture:
    file: str
    kind: str
    transcript: str
    follows: str = ""


@dataclass
class VoiceTurn:
    """One answered fixture in one mode; times in ms from the end of speech."""

    file: str
    kind: str
    speculative: bool
    reference: str
    transcript: str
    answer: str
    speech_end_s: float
    """Position of the end of speech in the recording."""
    start_ms: int
    """When the turn started: at the pause (early start) or at the endpoint."""
    endpoint_ms: int
    asr_ms: int | None
    first_token_ms: int | None
    first_audio_ms: int | None
    total_ms: int | None
    tokens_per_s: float | None
    acceptance_rate: float | None
    mean_accepted: float | None
    answer_tokens: int
    word_errors: int
    reference_words: int


def read_manifest(folder: Path) -> list[Fixture]:
    """Return the spoken fixtures listed in ``folder``/MANIFEST.tsv."""
    manifest = folder / "MANIFEST.tsv"
    if not manifest.is_file():
        raise AudioInputError(f"{manifest} not found; pass the folder of the spoken fixtures with --fixtures (the repository's audio_fixtures)")
    with open(manifest, newline="", encoding="utf-8") as file:
        rows = list(csv.DictReader(file, delimiter="\t"))
    return [Fixture(row["file"], row["kind"], row["transcript"], row.get("follows") or "") for row in rows if row["kind"] in SPOKEN_KINDS]


def turn_audio(audio: np.ndarray, listen: ListenConfig) -> tuple[np.ndarray, float, int]:
    """Return what a live turn over ``audio`` starts with.

    That is the audio the turn gets, the end of speech in the recording (seconds) and
    when the turn starts (ms after the end of speech). The live endpointer runs over the
    recording with a second of silence before it and enough silence after it. Each
    fixture is one question, so a pause inside the recording does not end the turn here.
    The turn starts at the last pause of ``listen.early_start_ms``, or with early start
    off at the endpoint.
    """
    start_ms = listen.early_start_ms or listen.silence_ms
    endpointer = Endpointer(
        silence_ms=_NEVER_MS,
        aggressiveness=listen.vad_aggressiveness,
        max_turn_s=120,
        preroll_ms=listen.preroll_ms,
        min_speech_ms=listen.min_speech_ms,
        pause_ms=start_ms,
    )
    lead = np.zeros(SAMPLE_RATE, dtype=np.float32)
    # A second more than the pause: a recording may end in voiced frames.
    trail = np.zeros(SAMPLE_RATE * (start_ms + 1000) // 1000, dtype=np.float32)
    pauses = [event for event in endpointer.feed(np.concatenate([lead, audio, trail])) if isinstance(event, Pause)]
    if not pauses:
        # No speech the endpointer would open a turn for: the whole recording, at its end.
        return audio, len(audio) / SAMPLE_RATE, start_ms
    return pauses[-1].audio, pauses[-1].speech_end_s - 1.0, start_ms


async def _turn(assistant, fixture: Fixture, folder: Path, speculative: bool, reply: Path, references: dict[str, Fixture]) -> VoiceTurn:
    await assistant.settle()
    assistant.llm.new_conversation()
    if fixture.follows and fixture.follows in references:
        # The question this one follows, as an untimed text turn.
        await assistant.respond_to_text(references[fixture.follows].transcript, None, speculative=speculative)
        # A user asks the next question seconds later, after the next-turn prefill is done.
        await assistant.settle()
    listen = assistant.config.listen
    recording, speech_end, start_ms = turn_audio(load_speech(folder / fixture.file), listen)
    endpoint_ms = listen.silence_ms
    started_at = time.perf_counter() - start_ms / 1000
    hold = None
    if listen.early_start_ms:
        hold = Hold()
        asyncio.get_running_loop().call_later((endpoint_ms - start_ms) / 1000, hold.release, endpoint_ms)
    result = await assistant.respond_to_audio(
        recording, WavFileSink(reply), speculative=speculative, started_at=started_at, endpoint_ms=None if hold else endpoint_ms, hold=hold
    )
    metrics = result.metrics

    transcript = result.transcript.text if result.transcript else ""
    errors, words = word_errors(fixture.transcript, transcript)
    return VoiceTurn(
        file=fixture.file,
        kind=fixture.kind,
        speculative=speculative,
        reference=fixture.transcript,
        transcript=transcript,
        answer=result.answer,
        speech_end_s=round(speech_end, 3),
        start_ms=start_ms,
        endpoint_ms=endpoint_ms,
        asr_ms=metrics.asr_ms,
        first_token_ms=metrics.first_token_ms,
        first_audio_ms=metrics.first_audio_ms,
        total_ms=metrics.total_ms,
        tokens_per_s=metrics.tokens_per_s,
        acceptance_rate=metrics.acceptance_rate,
        mean_accepted=metrics.mean_accepted,
        answer_tokens=metrics.answer_tokens,
        word_errors=errors,
        reference_words=words,
    )


async def run_voice_benchmark(
    assistant,
    folder: Path,
    fixtures: list[Fixture],
    reply_folder: Path,
    progress: Callable[[VoiceTurn], None] | None = None,
) -> list[VoiceTurn]:
    """Answer every fixture with speculation on and off, interleaved; return the recorded turns."""
    references = {fixture.file: fixture for fixture in read_manifest(folder)}
    reply = reply_folder / "reply.wav"
    # Warm-up: the first turn pays for lazy initialisation in Whisper, piper and torch.
    await _turn(assistant, fixtures[0], folder, True, reply, references)
    turns: list[VoiceTurn] = []
    for number, fixture in enumerate(fixtures):
        # Alternating the order keeps either mode from always running second, on caches
        # and CPU clocks the other mode warmed.
        for speculative in ((True, False) if number % 2 == 0 else (False, True)):
            turn = await _turn(assistant, fixture, folder, speculative, reply, references)
            turns.append(turn)
            if progress:
                progress(turn)
    return turns


def _percentile(values: list[float], percent: float) -> float | None:
    return float(np.percentile(values, percent)) if values else None


def summarize(turns: list[VoiceTurn]) -> dict[str, Any]:
    """Return the p50 and p95 of every figure in both modes, their ratio, and the headline numbers."""
    figures = {}
    for field, label, unit in FIGURES:
        entry: dict[str, Any] = {"label": label, "unit": unit}
        for name, speculative in (("on", True), ("off", False)):
            values = [getattr(turn, field) for turn in turns if turn.speculative is speculative and getattr(turn, field) is not None]
            entry[name] = {"p50": _percentile(values, 50), "p95": _percentile(values, 95), "count": len(values)}
        on, off = entry["on"]["p50"], entry["off"]["p50"]
        entry["off_over_on"] = off / on if on and off is not None else None
        figures[field] = entry
    spoken = [turn for turn in turns if turn.speculative]
    answered = [turn for turn in turns if turn.first_audio_ms is not None]
    return {
        "first_audio_ms_p50": figures["first_audio_ms"]["on"]["p50"],
        "first_audio_ms_p95": figures["first_audio_ms"]["on"]["p95"],
        "first_audio_speedup": figures["first_audio_ms"]["off_over_on"],
        "tokens_per_s_speedup": _inverse(figures["tokens_per_s"]["off_over_on"]),
        "wer": word_error_rate([(turn.reference, turn.transcript) for turn in spoken]),
        "fixtures": len(spoken),
        "turns_without_audio": len(turns) - len(answered),
        "identical_answers": _identical_answers(turns),
        "figures": figures,
    }


def _inverse(value: float | None) -> float | None:
    return 1 / value if value else None


def _identical_answers(turns: list[VoiceTurn]) -> float | None:
    """Fraction of fixtures whose answer is the same in both modes (it must be, under greedy decoding)."""
    by_file: dict[str, dict[bool, str]] = {}
    for turn in turns:
        by_file.setdefault(turn.file, {})[turn.speculative] = turn.answer
    pairs = [answers for answers in by_file.values() if len(answers) == 2]
    return sum(answers[True] == answers[False] for answers in pairs) / len(pairs) if pairs else None


def typical_turn(turns: list[VoiceTurn]) -> VoiceTurn | None:
    """Return the speculative turn whose time to first audio is nearest the median."""
    spoken = [turn for turn in turns if turn.speculative and turn.first_audio_ms is not None]
    if not spoken:
        return None
    median = statistics.median(turn.first_audio_ms for turn in spoken)
    return min(spoken, key=lambda turn: abs(turn.first_audio_ms - median))


def settings_of(config: Config) -> dict[str, Any]:
    """Return the settings a voice benchmark report records, with ``auto`` resolved."""
    from voice.llm.loading import resolve_draft_weights

    llm = config.llm
    return {
        "target": llm.target,
        "draft": llm.draft if llm.drafter != "prompt_lookup" else "-",
        "drafter": llm.drafter,
        "draft_tokens": llm.draft_tokens,
        "adaptive_draft": llm.adaptive_draft,
        "draft_weights": resolve_draft_weights(llm.draft_weights),
        "draft_vocab": llm.draft_vocab,
        "asr": config.asr.model,
        "voice": config.tts.voice,
        "first_chunk_min_words": config.tts.first_chunk_min_words,
        "first_chunk_at_phrase": config.tts.first_chunk_at_phrase,
        "silence_ms": config.listen.silence_ms,
        "early_start_ms": config.listen.early_start_ms,
    }


def build_report(turns: list[VoiceTurn], settings: dict[str, Any], command: str) -> dict[str, Any]:
    return {**summarize(turns), "command": command, "settings": settings, "machine": machine_description(), "turns": [asdict(turn) for turn in turns]}


def format_table(report: dict[str, Any]) -> str:
    """Return the p50/p95 table of every figure, both modes and their ratio, as Markdown."""

    def show(value: float | None, unit: str) -> str:
        if value is None:
            return "-"
        if unit == "ms":
            return f"{value:.0f}"
        return f"{value:.2f}"

    lines = [
        "| figure | on p50 | on p95 | off p50 | off p95 | off / on (p50) |",
        "|---|---|---|---|---|---|",
    ]
    for field, entry in report["figures"].items():
        unit = entry["unit"]
        label = f"{entry['label']} ({unit})" if unit else entry["label"]
        ratio = entry["off_over_on"]
        cells = [show(entry["on"]["p50"], unit), show(entry["on"]["p95"], unit), show(entry["off"]["p50"], unit), show(entry["off"]["p95"], unit)]
        lines.append(f"| {label} | " + " | ".join(cells) + f" | {'-' if ratio is None else f'{ratio:.2f}'} |")
    return "\n".join(lines)


def write_waterfall(turn: VoiceTurn, path: Path) -> None:
    """Draw one bar per stage of ``turn`` on a shared time axis (ms from the end of speech)."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot

    stages = [
        ("silence before the turn starts", 0, turn.start_ms),
        ("speech recognition", turn.start_ms, turn.asr_ms),
        ("prompt to first verified token", turn.asr_ms, turn.first_token_ms),
        ("first chunk and its synthesis", turn.first_token_ms, turn.first_audio_ms),
        ("rest of the answer", turn.first_audio_ms, turn.total_ms),
    ]
    stages = [(name, start, end) for name, start, end in stages if start is not None and end is not None]
    figure, axis = pyplot.subplots(figsize=(9, 3.2))
    colors = ["#9e9e9e", "#42a5f5", "#ab47bc", "#ef5350", "#66bb6a"]
    for row, (name, start, end) in enumerate(stages):
        axis.barh(row, end - start, left=start, color=colors[row % len(colors)])
        axis.text(end + 40, row, f"{end - start:.0f} ms", va="center", fontsize=8)
    axis.set_yticks(range(len(stages)), [name for name, _, _ in stages])
    axis.invert_yaxis()
    axis.set_xlabel("ms after the end of speech")
    axis.set_title(f"A typical turn: {turn.file} (speculation on, first audio at {turn.first_audio_ms} ms)", fontsize=9)
    if turn.first_audio_ms is not None:
        axis.axvline(turn.first_audio_ms, color="black", linewidth=0.8, linestyle="--")
    # No audio plays before the endpoint, however early the turn started.
    axis.axvline(turn.endpoint_ms, color="#616161", linewidth=0.8, linestyle=":")
    axis.text(turn.endpoint_ms, len(stages) - 0.4, " endpoint", fontsize=8, color="#616161")
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    pyplot.close(figure)


def write_comparison(turns: list[VoiceTurn], path: Path) -> None:
    """Draw the time to first audio of every fixture with speculation on and off."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot

    files = list(dict.fromkeys(turn.file for turn in turns))
    values = {(turn.file, turn.speculative): turn.first_audio_ms for turn in turns}
    positions = np.arange(len(files))
    figure, axis = pyplot.subplots(figsize=(10, 4.2))
    for offset, speculative, label, color in ((-0.2, True, "speculation on", "#42a5f5"), (0.2, False, "speculation off", "#bdbdbd")):
        heights = [values.get((file, speculative)) or 0 for file in files]
        axis.bar(positions + offset, heights, width=0.4, label=label, color=color)
        finite = [height for height in heights if height]
        if finite:
            axis.axhline(statistics.median(finite), color=color, linestyle="--", linewidth=1)
    axis.set_xticks(positions, [Path(file).stem.removeprefix("en_") for file in files], rotation=60, ha="right", fontsize=7)
    axis.set_ylabel("ms from end of speech to first audio")
    axis.set_title("Time to first audio per fixture (dashed: medians)", fontsize=9)
    axis.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    pyplot.close(figure)


def format_markdown(report: dict[str, Any], images: tuple[str, str]) -> str:
    """Return a report a person can paste into an issue: headline, table, machine and versions."""
    machine = report["machine"]
    memory = f"{machine['memory_bytes'] / 2**30:.0f} GiB" if machine.get("memory_bytes") else "unknown"
    settings = report["settings"]

    def number(value: float | None, pattern: str) -> str:
        return "-" if value is None else pattern.format(value)

    lines = [
        "## voice bench voice",
        "",
        f"{report['fixtures']} spoken fixtures, speculation on and off, interleaved, after a warm-up turn. "
        "Times are milliseconds from the end of speech.",
        "",
        f"- first audio with speculation: p50 {number(report['first_audio_ms_p50'], '{:.0f}')} ms, "
        f"p95 {number(report['first_audio_ms_p95'], '{:.0f}')} ms",
        f"- speculation reaches first audio {number(report['first_audio_speedup'], '{:.2f}')}x sooner "
        f"(median off / on); tokens per second {number(report['tokens_per_s_speedup'], '{:.2f}')}x",
        f"- word error rate of the transcripts: {number(report['wer'], '{:.1%}')}",
        f"- answers identical in both modes: {number(report['identical_answers'], '{:.0%}')}",
        "",
        format_table(report),
        "",
        f"Machine: {machine['cpu']}, {machine['cores']} cores, {memory}, SIMD {', '.join(machine['simd']) or 'none'}; "
        f"native int4/int8 kernels {machine.get('native_kernels', 'unknown')}; Python {machine['python']}.",
        "",
        "Packages: " + ", ".join(f"{package} {machine.get(package) or 'not installed'}" for package in PACKAGES) + ".",
        "",
        "Settings: " + ", ".join(f"{key} {value}" for key, value in settings.items()) + ".",
        "",
        f"Command: `{report['command']}`",
        "",
        f"![waterfall of a typical turn]({images[0]})",
        f"![first audio with speculation on and off]({images[1]})",
        "",
    ]
    return "\n".join(lines)


def write_report(report: dict[str, Any], turns: list[VoiceTurn], output_dir: Path) -> list[Path]:
    """Write bench-voice.json, the two PNG charts and bench-voice.md into ``output_dir``."""
    output_dir.mkdir(parents=True, exist_ok=True)
    json_path = output_dir / "bench-voice.json"
    waterfall = output_dir / "bench-voice-waterfall.png"
    comparison = output_dir / "bench-voice-first-audio.png"
    markdown = output_dir / "bench-voice.md"
    json_path.write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    typical = typical_turn(turns)
    if typical is not None:
        write_waterfall(typical, waterfall)
    write_comparison(turns, comparison)
    markdown.write_text(format_markdown(report, (waterfall.name, comparison.name)), encoding="utf-8")
    return [json_path, waterfall, comparison, markdown]


def progress_bar(total: int):
    """Return a callback that advances a progress bar on stderr by one turn."""
    from tqdm import tqdm

    bar = tqdm(total=total, unit="turn", file=sys.stderr, dynamic_ncols=True)

    def advance(turn: VoiceTurn) -> None:
        mode = "on" if turn.speculative else "off"
        bar.set_postfix_str(f"{Path(turn.file).stem[:28]} {mode}: first audio {turn.first_audio_ms} ms")
        bar.update(1)
        if bar.n >= total:
            bar.close()

    return advance
