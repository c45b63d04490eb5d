"""Chat history and prompt building, trimmed to the context limit."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

from transformers import PreTrainedTokenizerBase

logger = logging.getLogger(__name__)


@dataclass
class Exchange:
    user: str
    assistant: str


@dataclass
class Conversation:
    """The system prompt and the question-answer pairs a new prompt repeats."""

    system_prompt: str
    max_history_turns: int
    history: list[Exchange] = field(default_factory=list)

    def messages(self, user_text: str, history: list[Exchange]) -> list[dict[str, str]]:
        messages = [{"role": "system", "content": self.system_prompt}]
        for exchange in history:
            messages.append({"role": "user", "content": exchange.user})
            messages.append({"role": "assistant", "content": exchange.assistant})
        messages.append({"role": "user", "content": user_text})
        return messages

    def prompt_ids(self, tokenizer: PreTrainedTokenizerBase, user_text: str, max_prompt_tokens: int) -> list[int]:
        """Return the chat prompt for ``user_text``, dropping the oldest turns until it fits."""
        history = self.history[-self.max_history_turns :] if self.max_history_turns else []
        while True:
            ids = tokenizer.apply_chat_template(
                self.messages(user_text, history), add_generation_prompt=True, tokenize=True, return_dict=False
            )
            if len(ids) <= max_prompt_tokens or not history:
                break
            history = history[1:]
        if len(ids) > max_prompt_tokens:
            # Even without history the question is too long: keep the system prompt's
            # framing by cutting the user's words, not the template.
            logger.warning("Question is %d tokens, over the %d-token prompt limit; cutting it", len(ids), max_prompt_tokens)
            words = user_text.split()
            while len(ids) > max_prompt_tokens and len(words) > 1:
                words = words[: len(words) * 3 // 4]
                ids = tokenizer.apply_chat_template(
                    self.messages(" ".join(words), []), add_generation_prompt=True, tokenize=True, return_dict=False
                )
        return list(ids)

    def shared_prefix_ids(self, tokenizer: PreTrainedTokenizerBase, max_prompt_tokens: int = 1_000_000) -> list[int]:
        """Return the tokens that open the next prompt whatever the question.

        These are the system prompt, the history and the opening of the user message.
        """
        first = self.prompt_ids(tokenizer, "a", max_prompt_tokens)
        second = self.prompt_ids(tokenizer, "z", max_prompt_tokens)
        common = 0
        while common < min(len(first), len(second)) and first[common] == second[common]:
            common += 1
        return first[:common]

    def add(self, user_text: str, assistant_text: str) -> None:
        self.history.append(Exchange(user_text, assistant_text))
        if self.max_history_turns and len(self.history) > self.max_history_turns:
            del self.history[: len(self.history) - self.max_history_turns]
        elif not self.max_history_turns:
            self.history.clear()

    def clear(self) -> None:
        self.history.clear()
