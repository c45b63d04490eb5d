"""A fixed set of spoken-assistant prompts for benchmarking the language-model stage.

The prompts are what a person says to a voice assistant, in five categories:

- ``fact``: a short factual question.
- ``howto``: a request for brief instructions.
- ``arithmetic``: a calculation said in words.
- ``home``: a device command (timers, lights, music). The assistant cannot control
  devices and its system prompt tells it so, so these measure short refusals.
- ``followup``: a question that only makes sense after earlier turns, which the prompt
  carries as (user, assistant) pairs.
"""

from __future__ import annotations

from dataclasses import dataclass

CATEGORIES = ("fact", "howto", "arithmetic", "home", "followup")


@dataclass(frozen=True)
class BenchPrompt:
    """One benchmark prompt: a question, and for ``followup`` the turns before it."""

    id: str
    """Unique kebab-case id that starts with the category, such as ``fact-capital-france``."""
    category: str
    question: str
    history: tuple[tuple[str, str], ...] = ()
    """Earlier (user, assistant) turns, oldest first."""

    def __post_init__(self) -> None:
        if self.category not in CATEGORIES:
            raise ValueError(f"invalid category {self.category!r} for prompt {self.id!r}: expected one of {CATEGORIES}")


def _fact(slug: str, question: str) -> BenchPrompt:
    return BenchPrompt(id=f"fact-{slug}", category="fact", question=question)


def _howto(slug: str, question: str) -> BenchPrompt:
    return BenchPrompt(id=f"howto-{slug}", category="howto", question=question)


def _arithmetic(slug: str, question: str) -> BenchPrompt:
    return BenchPrompt(id=f"arithmetic-{slug}", category="arithmetic", question=question)


def _home(slug: str, question: str) -> BenchPrompt:
    return BenchPrompt(id=f"home-{slug}", category="home", question=question)


def _followup(slug: str, history: tuple[tuple[str, str], ...], question: str) -> BenchPrompt:
    return BenchPrompt(id=f"followup-{slug}", category="followup", question=question, history=history)


PROMPTS: tuple[BenchPrompt, ...] = (
    _fact("capital-france", "What is the capital of France?"),
    _fact("tallest-mountain", "What is the tallest mountain in the world?"),
    _fact("water-boiling-point", "At what temperature does water boil?"),
    _fact("moon-landing", "Who was the first person to walk on the moon?"),
    _fact("largest-ocean", "Which ocean is the largest?"),
    _fact("spider-legs", "How many legs does a spider have?"),
    _fact("romeo-juliet-author", "Who wrote Romeo and Juliet?"),
    _fact("speed-of-light", "How fast does light travel?"),
    _howto("boil-egg", "How do I boil an egg?"),
    _howto("tie-tie", "How do you tie a tie?"),
    _howto("fall-asleep", "How can I fall asleep faster?"),
    _howto("remove-coffee-stain", "How do I get a coffee stain out of a shirt?"),
    _howto("plant-tomatoes", "How do I plant tomatoes?"),
    _howto("screenshot-laptop", "How do I take a screenshot on my laptop?"),
    _howto("cook-rice", "How do I cook rice on the stove?"),
    _arithmetic("twelve-times-fifteen", "What is twelve times fifteen?"),
    _arithmetic("tip-on-bill", "What is a fifteen percent tip on forty two dollars?"),
    _arithmetic("square-root", "What is the square root of one hundred forty four?"),
    _arithmetic("seconds-in-day", "How many seconds are there in a day?"),
    _arithmetic("split-bill", "If dinner costs ninety dollars and we split it four ways, how much does each person pay?"),
    _arithmetic("miles-to-kilometers", "How many kilometers is ten miles?"),
    _arithmetic("half-of-seventy-nine", "What is half of seventy nine?"),
    _home("kitchen-lights-off", "Turn off the kitchen lights."),
    _home("timer-ten-minutes", "Set a timer for ten minutes."),
    _home("alarm-seven", "Wake me up at seven tomorrow morning."),
    _home("thermostat", "Set the thermostat to twenty one degrees."),
    _home("play-jazz", "Play some jazz in the living room."),
    _home("lock-front-door", "Lock the front door."),
    _home("volume-up", "Turn the volume up."),
    _followup(
        "japan-population",
        (("What is the capital of Japan?", "The capital of Japan is Tokyo."),),
        "And how many people live there?",
    ),
    _followup(
        "everest-climbers",
        (("What is the tallest mountain in the world?", "Mount Everest, at about eight thousand eight hundred meters."),),
        "Who climbed it first?",
    ),
    _followup(
        "pasta-cook-time",
        (("How much salt should I put in pasta water?", "About one tablespoon for every four liters of water."),),
        "And how long should I cook spaghetti?",
    ),
    _followup(
        "arithmetic-again",
        (("What is twelve times twelve?", "Twelve times twelve is one hundred forty four."),),
        "Now divide that by three.",
    ),
    _followup(
        "author-other-books",
        (("Who wrote Pride and Prejudice?", "Pride and Prejudice was written by Jane Austen."),),
        "What else did she write?",
    ),
    _followup(
        "mars-distance-travel",
        (
            ("How far away is Mars?", "Mars is on average about two hundred twenty five million kilometers from Earth."),
            ("How long does light take to get there?", "Light takes about twelve and a half minutes on average."),
        ),
        "And how long would a spacecraft take?",
    ),
    _followup(
        "translate-again",
        (("How do you say thank you in Spanish?", "In Spanish, thank you is gracias."),),
        "What about in German?",
    ),
)


def chat_messages(prompt: BenchPrompt, system_prompt: str) -> list[dict[str, str]]:
    """Build the chat messages for ``prompt``: the system prompt, each earlier turn, then the question.

    The list is in the role/content format that ``tokenizer.apply_chat_template`` takes.
    """
    messages = [{"role": "system", "content": system_prompt}]
    for user_text, assistant_text in prompt.history:
        messages.append({"role": "user", "content": user_text})
        messages.append({"role": "assistant", "content": assistant_text})
    messages.append({"role": "user", "content": prompt.question})
    return messages
