"""``voice bench llm``: our decoder with each drafter against plain decoding and transformers, interleaved.

Every prompt of ``voice.bench.prompts`` runs once in every mode, in an order that rotates
from prompt to prompt, so slow and fast minutes of a shared machine spread over all modes.
Ratios are taken per prompt (a mode's tokens per second over plain decoding's on the same
prompt) and summarized by their median.

Modes (all greedy, on the same target model object):

- ``plain``: our decoder with the target alone, the reference output;
- ``draft``: our decoder with the dense float draft model and its full vocabulary;
- ``draft-int8-vocab``: the draft with int8 linear layers and a frequency-ranked output
  vocabulary (``--draft-vocab`` tokens);
- ``draft-int4-vocab``: the same with int4 linear layers in every layer (the native
  kernels, activations in the model's dtype);
- ``lookup``: our decoder with prompt lookup;
- ``transformers-assisted``: ``generate(assistant_model=draft)`` with transformers' defaults;
- ``transformers-lookup``: ``generate(prompt_lookup_num_tokens=...)``;
- ``plain@int8``, ``draft@int8``, ``plain@int4``, ``draft@int4`` (``--weights``): our
  decoder on a copy of the target with int8 or int4 linear layers, alone and with the
  draft configured in ``llm`` (its vocabulary and weights); their speed is compared with
  plain decoding in the same weight format;
- ``llamacpp-plain``, ``llamacpp-speculative``: llama.cpp on the embedded GGUF files,
  where its programs are found (``voice.bench.llamacpp``).

Our decoders keep the system prompt prefilled, as the assistant does between turns;
transformers' ``generate`` prefills the whole prompt on every call. Time to first token
is reported for both, but speed ratios use tokens per second after the first token.
"""

from __future__ import annotations

import copy
import json
import logging
import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from voice.bench import ALL_MODES, LLAMACPP_MODES, OUR_MODES, baseline_of, weight_modes
from voice.bench import llamacpp
from voice.bench.machine import machine_description
from voice.bench.prompts import CATEGORIES, PROMPTS, BenchPrompt, chat_messages
from voice.bench.transformers_baselines import current_rss_bytes, peak_rss_bytes, run_generate
from voice.config import Config
from voice.llm.conversation import Conversation
from voice.llm.drafters import ModelDrafter, PromptLookupDrafter, quantize_linear_int8
from voice.llm.loading import LoadedModels, apply_weights, eos_token_ids, quantize_draft, resolve_draft_weights
from voice.llm.quant import quantize_model
from voice.llm.speculative import SpeculativeDecoder

logger = logging.getLogger(__name__)

PLAIN = "plain"
REFERENCE_TRANSFORMERS = "transformers-assisted"
WARM_UP_QUESTION = "Say hello in one short sentence."


@dataclass
class Run:
    """One prompt decoded in one mode."""

    mode: str
    prompt_id: str
    category: str
    tokens: list[int]
    first_token_s: float
    total_s: float
    tokens_per_s: float | None
    target_passes: int
    drafted: int = 0
    accepted: int = 0
    draft_steps: int = 0
    accept_counts: list[int] = field(default_factory=list)


@dataclass
class _Mode:
    name: str
    run: Callable[[list[int], int], Run]
    prepare: Callable[[], None] = lambda: None
    """Called before every prompt: puts the caches back to the system prompt."""


def select_prompts(count: int | None) -> list[BenchPrompt]:
    """Return ``count`` prompts spread over the categories in turn (all of them for None)."""
    if count is None or count >= len(PROMPTS):
        return list(PROMPTS)
    if count < 1:
        raise ValueError(f"the prompt count must be at least 1, got {count}")
    by_category = {category: [p for p in PROMPTS if p.category == category] for category in CATEGORIES}
    chosen: list[BenchPrompt] = []
    index = 0
    while len(chosen) < count:
        for category in CATEGORIES:
            if index < len(by_category[category]) and len(chosen) < count:
                chosen.append(by_category[category][index])
        index += 1
    return chosen


def _our_mode(name: str, decoder: SpeculativeDecoder, speculative: bool, system_ids: list[int]) -> _Mode:
    def run(prompt_ids: list[int], max_new_tokens: int) -> Run:
        steps = decoder.generate(prompt_ids, max_new_tokens, speculative=speculative)
        tokens = [token for step in steps for token in step]
        stats = decoder.stats
        return Run(
            mode=name,
            prompt_id="",
            category="",
            tokens=tokens,
            first_token_s=stats.first_token_s or stats.total_s,
            total_s=stats.total_s,
            tokens_per_s=stats.tokens_per_s,
            target_passes=stats.steps,
            drafted=stats.drafted,
            accepted=stats.accepted,
            draft_steps=stats.draft_steps,
            accept_counts=list(stats.accept_counts),
        )

    def prepare() -> None:
        decoder.prefill(system_ids)

    return _Mode(name, run, prepare)


def _transformers_mode(name: str, models: LoadedModels, eos: set[int], draft_model, lookup_tokens: int | None) -> _Mode:
    def run(prompt_ids: list[int], max_new_tokens: int) -> Run:
        result = run_generate(
            models.target_model, prompt_ids, max_new_tokens, eos, assistant_model=draft_model, prompt_lookup_num_tokens=lookup_tokens
        )
        return Run(
            mode=name,
            prompt_id="",
            category="",
            tokens=result.token_ids,
            first_token_s=result.first_token_s,
            total_s=result.total_s,
            tokens_per_s=_rate_after_first_pass(result),
            target_passes=result.steps,
        )

    return _Mode(name, run)


def _rate_after_first_pass(result) -> float | None:
    """Tokens per second after the first target pass, which in assisted modes yields several tokens.

    Our decoder's first pass yields exactly one token, so for it this is the same rate as
    ``DecodeStats.tokens_per_s``.
    """
    first_pass_tokens = min(result.first_step_tokens, len(result.token_ids))
    later_tokens = len(result.token_ids) - first_pass_tokens
    seconds = result.total_s - result.first_token_s
    return later_tokens / seconds if later_tokens > 0 and seconds > 0 else None


def build_modes(
    models: LoadedModels,
    modes: list[str],
    system_ids: list[int],
    draft_tokens: int,
    adaptive: bool,
    draft_vocab_ids: torch.Tensor | None,
    lookup_max_ngram: int,
    min_confidence: float = 0.0,
) -> tuple[list[_Mode], dict[str, int]]:
    """Create the decoders of ``modes``; return them and the resident memory each one added (bytes)."""
    eos = eos_token_ids(models.tokenizer, models.target_model)
    built: list[_Mode] = []
    added: dict[str, int] = {}
    for name in modes:
        before = current_rss_bytes()
        if name == "plain":
            decoder = SpeculativeDecoder(models.target_model, None, eos)
            mode = _our_mode(name, decoder, False, system_ids)
        elif name in ("draft", "draft-int8-vocab", "draft-int4-vocab", "lookup"):
            if name == "lookup":
                drafter = PromptLookupDrafter(lookup_max_ngram)
            elif name == "draft":
                drafter = ModelDrafter(models.draft_model, min_confidence=min_confidence)
            elif name == "draft-int4-vocab":
                draft_copy = copy.deepcopy(models.draft_model)
                drafter = ModelDrafter(draft_copy, draft_vocab_ids, min_confidence=min_confidence)
                quantize_model(draft_copy, "int4")
            else:
                # int8 drafts run in float32, as the assistant loads them.
                draft_copy = copy.deepcopy(models.draft_model).float()
                drafter = ModelDrafter(draft_copy, draft_vocab_ids, min_confidence=min_confidence)
                quantize_linear_int8(draft_copy)
            decoder = SpeculativeDecoder(models.target_model, drafter, eos, draft_tokens, adaptive)
            mode = _our_mode(name, decoder, True, system_ids)
        elif name == "transformers-assisted":
            mode = _transformers_mode(name, models, eos, models.draft_model, None)
        elif name == "transformers-lookup":
            mode = _transformers_mode(name, models, eos, None, draft_tokens)
        else:
            raise ValueError(f"unknown benchmark mode {name!r}; choose from {', '.join(ALL_MODES)}")
        if name in OUR_MODES:
            decoder.prefill(system_ids)
            if adaptive and decoder.drafter is not None:
                decoder.calibrate()
        built.append(mode)
        added[name] = max(0, current_rss_bytes() - before)
    return built, added


def _llamacpp_mode(name: str, program: Path, target: Path, draft: Path | None, draft_tokens: int, decode_text) -> _Mode:
    threads = torch.get_num_threads()

    def run(prompt_ids: list[int], max_new_tokens: int) -> Run:
        try:
            result = llamacpp.run_program(program, target, decode_text(prompt_ids), max_new_tokens, threads, draft, draft_tokens)
        except (RuntimeError, ValueError) as error:
            logger.warning("%s: %s", name, error)
            return Run(mode=name, prompt_id="", category="", tokens=[], first_token_s=0.0, total_s=0.0, tokens_per_s=None, target_passes=0)
        return Run(
            mode=name,
            prompt_id="",
            category="",
            # llama.cpp reports counts, not ids: its output is not compared token for token.
            tokens=[],
            first_token_s=result.first_token_s,
            total_s=result.total_s,
            tokens_per_s=result.tokens_per_s,
            target_passes=0,
            drafted=result.drafted,
            accepted=result.accepted,
        )

    return _Mode(name, run)


def build_weight_modes(
    models: LoadedModels, config: Config, weights: str, system_ids: list[int], draft_vocab_ids: torch.Tensor | None, cache: Path
) -> tuple[list[_Mode], dict[str, int]]:
    """Plain and speculative modes on a copy of the target with ``weights`` linear layers."""
    eos = eos_token_ids(models.tokenizer, models.target_model)
    plain_name, draft_name = weight_modes(weights)
    before = current_rss_bytes()
    target = copy.deepcopy(models.target_model)
    apply_weights(target, weights, config.llm.target, models.target_source, cache, "target")
    plain = SpeculativeDecoder(target, None, eos)
    plain.prefill(system_ids)
    added = {plain_name: max(0, current_rss_bytes() - before)}
    built = [_our_mode(plain_name, plain, False, system_ids)]
    if models.draft_model is not None:
        before = current_rss_bytes()
        draft = copy.deepcopy(models.draft_model)
        if resolve_draft_weights(config.llm.draft_weights) == "int8":
            draft = draft.float()  # as the assistant loads an int8 draft
        drafter = ModelDrafter(draft, draft_vocab_ids, config.llm.draft_threads, config.llm.draft_min_confidence)
        quantize_draft(draft, config.llm, models.draft_source, cache)
        decoder = SpeculativeDecoder(target, drafter, eos, config.llm.draft_tokens, config.llm.adaptive_draft)
        decoder.prefill(system_ids)
        if config.llm.adaptive_draft:
            decoder.calibrate()
        built.append(_our_mode(draft_name, decoder, True, system_ids))
        added[draft_name] = max(0, current_rss_bytes() - before)
    return built, added


def build_llamacpp_modes(programs: dict[str, Path], target: Path, draft: Path | None, draft_tokens: int, decode_text) -> list[_Mode]:
    """llama.cpp modes for the programs found; the speculative one needs the draft's GGUF file."""
    built = []
    if "plain" in programs:
        built.append(_llamacpp_mode("llamacpp-plain", programs["plain"], target, None, draft_tokens, decode_text))
    if "speculative" in programs and draft is not None:
        built.append(_llamacpp_mode("llamacpp-speculative", programs["speculative"], target, draft, draft_tokens, decode_text))
    return built


def run_benchmark(
    models: LoadedModels,
    config: Config,
    modes: list[str],
    prompts: list[BenchPrompt],
    max_new_tokens: int,
    draft_vocab_ids: torch.Tensor | None,
    progress: Callable[[str], None] = lambda line: print(line, flush=True),
    weights: tuple[str, ...] = ("dense",),
    cache: Path | None = None,
    llamacpp_setup: tuple[dict[str, Path], Path, Path | None] | None = None,
) -> dict[str, Any]:
    """Run every prompt in every mode, interleaved; return the report as a JSON-ready dict.

    ``weights`` adds plain and speculative modes for each quantized format (packed weights
    kept in ``cache``); ``llamacpp_setup`` (programs, target GGUF, draft GGUF) adds
    llama.cpp's modes.
    """
    if PLAIN not in modes:
        modes = [PLAIN] + modes
    tokenizer = models.tokenizer
    system_prompt = config.llm.system_prompt

    def encode(messages: list[dict[str, str]]) -> list[int]:
        ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
        return list(ids["input_ids"] if isinstance(ids, dict) or hasattr(ids, "keys") else ids)

    system_ids = Conversation(system_prompt, 0).shared_prefix_ids(tokenizer)
    built, added_memory = build_modes(
        models,
        modes,
        system_ids,
        config.llm.draft_tokens,
        config.llm.adaptive_draft,
        draft_vocab_ids,
        config.llm.lookup_max_ngram,
        config.llm.draft_min_confidence,
    )
    for format_name in weights:
        if format_name != "dense":
            quantized, memory = build_weight_modes(models, config, format_name, system_ids, draft_vocab_ids, cache or Path("."))
            built += quantized
            added_memory.update(memory)
    if llamacpp_setup is not None:
        programs, target_gguf, draft_gguf = llamacpp_setup
        built += build_llamacpp_modes(programs, target_gguf, draft_gguf, config.llm.draft_tokens, tokenizer.decode)

    warm_up = encode([{"role": "system", "content": system_prompt}, {"role": "user", "content": WARM_UP_QUESTION}])
    for mode in built:
        mode.prepare()
        mode.run(warm_up, 8)

    runs: list[Run] = []
    started = time.monotonic()
    for index, prompt in enumerate(prompts):
        prompt_ids = encode(chat_messages(prompt, system_prompt))
        rotation = index % len(built)
        order = built[rotation:] + built[:rotation]
        line = []
        for mode in order:
            mode.prepare()
            run = mode.run(prompt_ids, max_new_tokens)
            run.prompt_id, run.category = prompt.id, prompt.category
            runs.append(run)
            line.append(f"{mode.name} {run.tokens_per_s or 0:.2f}")
        elapsed = time.monotonic() - started
        progress(f"[{index + 1}/{len(prompts)}] {prompt.id} ({elapsed / 60:.1f} min): " + ", ".join(sorted(line)) + " tok/s")

    report = summarize(runs, [mode.name for mode in built])
    report["prompt_texts"] = {prompt.id: tokenizer.decode(next(r.tokens for r in runs if r.prompt_id == prompt.id and r.mode == PLAIN)) for prompt in prompts}
    report["memory"] = {"peak_rss_bytes": peak_rss_bytes(), "added_rss_bytes_per_mode": added_memory}
    report["settings"] = {
        "max_new_tokens": max_new_tokens,
        "draft_tokens": config.llm.draft_tokens,
        "adaptive_draft": config.llm.adaptive_draft,
        "draft_vocab": 0 if draft_vocab_ids is None else int(draft_vocab_ids.numel()),
        "lookup_max_ngram": config.llm.lookup_max_ngram,
        "draft_min_confidence": config.llm.draft_min_confidence,
        "weights": list(weights),
        "draft_weights": resolve_draft_weights(config.llm.draft_weights),
        "llamacpp_programs": {key: str(path) for key, path in (llamacpp_setup[0] if llamacpp_setup else {}).items()},
        "target": config.llm.target,
        "draft": config.llm.draft,
        "dtype": str(models.target_model.dtype).removeprefix("torch."),
        "torch_threads": torch.get_num_threads(),
        "prompts": len(prompts),
        "system_prompt_tokens": len(system_ids),
    }
    report["machine"] = machine_description()
    return report


def _median(values: list[float]) -> float | None:
    return statistics.median(values) if values else None


def summarize(runs: list[Run], modes: list[str]) -> dict[str, Any]:
    """Per-mode medians, per-prompt ratios against plain decoding, and the headline figures.

    A mode's ratio is taken against plain decoding with the same weights (``plain@int4``
    for ``draft@int4``), llama.cpp's against our dense plain decoding.
    """
    by_key = {(run.mode, run.prompt_id): run for run in runs}
    summary: dict[str, Any] = {"modes": {}, "runs": [asdict(run) for run in runs]}
    for mode in modes:
        mine = [run for run in runs if run.mode == mode]
        base = {run.prompt_id: by_key.get((baseline_of(mode), run.prompt_id)) for run in mine}
        # Ratio to the baseline on the same prompt, where both rates exist.
        ratios = [
            (run.category, run.tokens_per_s / base[run.prompt_id].tokens_per_s)
            for run in mine
            if run.tokens_per_s and base[run.prompt_id] is not None and base[run.prompt_id].tokens_per_s
        ]
        speedups = [ratio for _, ratio in ratios]
        by_category = {}
        for category in CATEGORIES:
            values = [ratio for run_category, ratio in ratios if run_category == category]
            if values:
                by_category[category] = _median(values)

        drafted = sum(run.drafted for run in mine)
        accepted = sum(run.accepted for run in mine)
        draft_steps = sum(run.draft_steps for run in mine)
        histogram = [sum(counts) for counts in zip(*[run.accept_counts for run in mine if run.accept_counts])] if mine else []
        compared = [run for run in mine if mode not in LLAMACPP_MODES and base[run.prompt_id] is not None]
        summary["modes"][mode] = {
            "baseline": baseline_of(mode),
            "tokens_per_s_median": _median([run.tokens_per_s for run in mine if run.tokens_per_s]),
            "first_token_ms_median": _median([1000 * run.first_token_s for run in mine]),
            "total_s_median": _median([run.total_s for run in mine]),
            "new_tokens_median": _median([len(run.tokens) for run in mine]) if mode not in LLAMACPP_MODES else None,
            "target_passes_total": sum(run.target_passes for run in mine),
            "speedup_vs_plain_median": _median(speedups),
            "speedup_vs_plain_min": min(speedups) if speedups else None,
            "speedup_vs_plain_by_category": by_category,
            "identical_greedy": sum(run.tokens == base[run.prompt_id].tokens for run in compared) / len(compared) if compared else None,
            "acceptance_rate": accepted / drafted if drafted else None,
            "mean_accepted_length": accepted / draft_steps if draft_steps else None,
            "accepted_length_histogram": histogram,
        }
    ours = [mode for mode in modes if mode in OUR_MODES and mode != PLAIN]
    best = max(ours, key=lambda mode: summary["modes"][mode]["speedup_vs_plain_median"] or 0.0, default=None)
    summary["best_mode"] = best
    summary["speedup_vs_plain"] = summary["modes"][best]["speedup_vs_plain_median"] if best else None
    if best and REFERENCE_TRANSFORMERS in modes:
        reference = {run.prompt_id: run for run in runs if run.mode == REFERENCE_TRANSFORMERS}
        ratios = [
            run.tokens_per_s / reference[run.prompt_id].tokens_per_s
            for run in runs
            if run.mode == best and run.tokens_per_s and reference[run.prompt_id].tokens_per_s
        ]
        summary["speedup_vs_transformers"] = _median(ratios)
    else:
        summary["speedup_vs_transformers"] = None
    identical = [summary["modes"][mode]["identical_greedy"] for mode in modes if mode != PLAIN and summary["modes"][mode]["identical_greedy"] is not None]
    summary["identical_greedy"] = min(identical) if identical else None

    def rate(mode: str) -> float:
        return summary["modes"][mode]["tokens_per_s_median"] or 0.0

    ours_all = [mode for mode in modes if mode in OUR_MODES or "@" in mode]
    best_ours = max(ours_all, key=rate, default=None)
    summary["best_configuration"] = best_ours
    summary["tokens_per_s_best"] = rate(best_ours) if best_ours else None
    theirs = [mode for mode in modes if mode in LLAMACPP_MODES and rate(mode)]
    summary["best_llamacpp"] = max(theirs, key=rate, default=None)
    summary["tokens_per_s_llamacpp"] = rate(summary["best_llamacpp"]) if theirs else None
    summary["speedup_by_weights"] = {
        mode.split("@")[1]: summary["modes"][mode]["speedup_vs_plain_median"] for mode in modes if mode.startswith("draft@")
    }
    return summary


def write_plot(report: dict[str, Any], path: Path) -> None:
    """Draw per-prompt speedups over plain decoding and the accepted-length histograms into a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    modes = [mode for mode in report["modes"] if mode != PLAIN and not mode.startswith("plain@")]
    runs = report["runs"]
    by_key = {(run["mode"], run["prompt_id"]): run for run in runs}
    figure, (left, right) = plt.subplots(1, 2, figsize=(13, 5))
    data = []
    for mode in modes:
        ratios = []
        for run in runs:
            base = by_key.get((baseline_of(mode), run["prompt_id"]))
            if run["mode"] == mode and run["tokens_per_s"] and base and base["tokens_per_s"]:
                ratios.append(run["tokens_per_s"] / base["tokens_per_s"])
        data.append(ratios or [0.0])
    left.boxplot(data, tick_labels=modes, orientation="horizontal")
    left.axvline(1.0, color="grey", linestyle="--", linewidth=1)
    left.set_xlabel("tokens per second / plain decoding with the same weights (per prompt)")
    left.set_title("Speed relative to plain decoding")

    width = 0.8 / max(1, len(modes))
    for offset, mode in enumerate(modes):
        histogram = report["modes"][mode]["accepted_length_histogram"]
        total = sum(histogram)
        if not total:
            continue
        positions = [length + offset * width for length in range(len(histogram))]
        right.bar(positions, [count / total for count in histogram], width=width, label=mode)
    right.set_xlabel("draft tokens accepted in a drafting step")
    right.set_ylabel("share of drafting steps")
    right.set_title("Accepted length")
    right.legend()
    machine = report["machine"]
    figure.suptitle(f"voice bench llm: {machine['cpu']}, {machine['cores']} cores, {report['settings']['dtype']}")
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)


def format_table(report: dict[str, Any]) -> str:
    """Return the per-mode summary as a plain-text table."""
    header = f"{'mode':<24}{'tok/s':>8}{'vs plain':>10}{'min':>7}{'first ms':>10}{'accept':>8}{'mean k':>8}{'identical':>11}"
    lines = [header, "-" * len(header)]
    for mode, row in report["modes"].items():

        def number(value, fmt):
            return format(value, fmt) if value is not None else "-"

        lines.append(
            f"{mode:<24}{number(row['tokens_per_s_median'], '.2f'):>8}{number(row['speedup_vs_plain_median'], '.2f'):>10}"
            f"{number(row['speedup_vs_plain_min'], '.2f'):>7}{number(row['first_token_ms_median'], '.0f'):>10}"
            f"{number(row['acceptance_rate'], '.0%'):>8}{number(row['mean_accepted_length'], '.2f'):>8}"
            f"{number(row['identical_greedy'], '.0%'):>11}"
        )
    return "\n".join(lines)


def write_report(report: dict[str, Any], output_dir: Path) -> tuple[Path, Path]:
    """Write bench-llm.json and bench-llm.png into ``output_dir``; return both paths."""
    output_dir.mkdir(parents=True, exist_ok=True)
    json_path = output_dir / "bench-llm.json"
    png_path = output_dir / "bench-llm.png"
    staging = json_path.with_suffix(".json.tmp")
    staging.write_text(json.dumps(report, indent=1))
    staging.replace(json_path)
    write_plot(report, png_path)
    return json_path, png_path
