"""LaCLIP-style prompts: an instruction, in-context examples chosen per caption, then the caption to rewrite."""
from __future__ import annotations

import hashlib
import random
import re
from dataclasses import dataclass

from .params import InContextExample


@dataclass(frozen=True)
class Prompt:
    instruction: str
    examples: tuple[tuple[str, str], ...]  # (caption, rewrite) pairs
    caption: str

    def messages(self) -> list[dict[str, str]]:
        """Chat form: the instruction as system message, each example as a user/assistant turn, then the caption;
        every caption is delimited (``delimit``), so that the model reads it as data."""
        out = [{"role": "system", "content": self.instruction}]
        for caption, rewrite in self.examples:
            out += [{"role": "user", "content": delimit(caption)}, {"role": "assistant", "content": rewrite}]
        return out + [{"role": "user", "content": delimit(self.caption)}]

    def text(self) -> str:
        """Completion form for models without a chat template: 'caption => rewrite' lines, the last one open."""
        lines = [self.instruction, ""] + [f"{caption} => {rewrite}" for caption, rewrite in self.examples]
        return "\n".join(lines + [f"{self.caption} =>"])


_TAG = re.compile(r"</?\s*caption\s*>", re.IGNORECASE)


def delimit(caption: str) -> str:
    """``caption`` between <caption> and </caption>, with any such tag inside it removed (it cannot close early)."""
    return f"<caption>{_TAG.sub(' ', caption).strip()}</caption>"


def undelimit(content: str) -> str:
    """The caption inside ``delimit``'s output (what an OpenAI-compatible test server answers about)."""
    return _TAG.sub("", content).strip()


def stable_seed(*parts: object) -> int:
    """A 64-bit seed from ``parts`` that is the same in every process (unlike ``hash``)."""
    return int.from_bytes(hashlib.sha256("\x00".join(map(str, parts)).encode()).digest()[:8], "big")


def build_prompt(uid: str, caption: str, instruction: str, examples: list[InContextExample],
                 examples_per_prompt: int, seed: int) -> Prompt:
    """The prompt for one caption; its examples are a sample of the pool that depends only on ``seed`` and ``uid``."""
    chosen = random.Random(stable_seed(seed, uid)).sample(range(len(examples)), examples_per_prompt)
    return Prompt(instruction, tuple((examples[i].caption, examples[i].rewrite) for i in sorted(chosen)), caption)


def clean_completion(text: str) -> str:
    """A generated answer reduced to the rewrite: its first non-empty line, without surrounding quotes."""
    for line in _TAG.sub(" ", text).strip().splitlines():
        line = line.strip()
        if line:
            if len(line) >= 2 and line[0] == line[-1] and line[0] in "\"'":
                line = line[1:-1].strip()
            return line
    return ""
