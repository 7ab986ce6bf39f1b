"""Rewriting with a local causal language model through ``transformers`` (batched, sampled generation).

The model directory is a ``save_pretrained`` layout (model + tokenizer); nothing is fetched from a hub.
A tokenizer with a chat template gets the chat form of the prompt, any other the 'caption => rewrite' form.
"""
from __future__ import annotations

from pathlib import Path

from clipmill.components.common.errors import ConfigError

from .generated import Generated
from .params import RewriteParams
from .prompt import Prompt, build_prompt, clean_completion, stable_seed


class LocalModelBackend:
    """Batch of captions in; ``rewrites_per_caption`` sampled continuations per caption out."""

    def __init__(self, params: RewriteParams, seed: int):
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self.params, self.seed = params, seed
        model_dir = Path(params.transformers.model_dir)
        if not (model_dir / "config.json").is_file():
            raise ConfigError(f"rewrite.transformers.model_dir: {model_dir} is not a saved model directory "
                              "(no config.json)")
        self.device = torch.device(params.transformers.device)
        self.tokenizer = AutoTokenizer.from_pretrained(model_dir, local_files_only=True)
        # Left padding keeps every prompt's end next to its generated tokens.
        self.tokenizer.padding_side = "left"
        if self.tokenizer.pad_token is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        self.lm = AutoModelForCausalLM.from_pretrained(model_dir, local_files_only=True).to(self.device).eval()

    def prompt_text(self, prompt: Prompt) -> str:
        if getattr(self.tokenizer, "chat_template", None):
            return self.tokenizer.apply_chat_template(prompt.messages(), tokenize=False, add_generation_prompt=True)
        return prompt.text()

    def _generate_chunk(self, uids: list[str], texts: list[str]) -> list[Generated]:
        import torch

        p, k = self.params, self.params.rewrites_per_caption
        encoded = self.tokenizer(texts, return_tensors="pt", padding=True).to(self.device)
        with torch.random.fork_rng(devices=[self.device] if self.device.type == "cuda" else []), torch.no_grad():
            torch.manual_seed(stable_seed(self.seed, uids[0]) % 2**63)
            output = self.lm.generate(**encoded, do_sample=True, temperature=p.temperature, top_p=p.top_p,
                                      max_new_tokens=p.max_tokens, num_return_sequences=k,
                                      pad_token_id=self.tokenizer.pad_token_id)
        decoded = self.tokenizer.batch_decode(output[:, encoded["input_ids"].shape[1]:], skip_special_tokens=True)
        return [Generated([clean_completion(t) for t in decoded[i * k:(i + 1) * k]]) for i in range(len(texts))]

    def generate(self, uids: list[str], captions: list[str], entries: list[list[str]]) -> list[Generated]:
        p = self.params
        texts = [self.prompt_text(build_prompt(uid, caption, p.instruction, p.examples, p.examples_per_prompt,
                                               self.seed)) for uid, caption in zip(uids, captions)]
        size = p.transformers.batch_size
        out: list[Generated] = []
        for start in range(0, len(texts), size):
            out += self._generate_chunk(uids[start:start + size], texts[start:start + size])
        return out
