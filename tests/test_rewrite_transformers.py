"""The transformers rewriting backend with a tiny GPT-2 and a word-level tokenizer built here (nothing downloaded)."""
from __future__ import annotations

import pandas as pd
import pytest

from clipmill.components.common.errors import ConfigError
from clipmill.components.common.hashing import make_uid
from clipmill.components.common.steps import StepContext
from clipmill.components.rewrite.backends import model_name
from clipmill.components.rewrite.captions import summarize
from clipmill.components.rewrite.local_model import LocalModelBackend
from clipmill.components.rewrite.params import RewriteParams, TransformersBackendParams
from clipmill.components.rewrite.prompt import build_prompt
from clipmill.components.rewrite.step import RewriteStep

CAPTIONS = [f"a {c} {s} on a plain background" for c in ("red", "blue", "green") for s in ("circle", "square")]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    """A 2-layer GPT-2 with random weights and a word-level tokenizer over the prompt vocabulary."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast

    params = RewriteParams()
    corpus = (CAPTIONS + [params.instruction] + [e.caption for e in params.examples]
              + [e.rewrite for e in params.examples])
    tokenizer = Tokenizer(models.WordLevel(unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer.train_from_iterator(corpus + ["=> \n"],
                                  trainers.WordLevelTrainer(special_tokens=["<unk>", "<pad>", "<eos>"]))
    fast = PreTrainedTokenizerFast(tokenizer_object=tokenizer, unk_token="<unk>", pad_token="<pad>", eos_token="<eos>")
    config = GPT2Config(vocab_size=fast.vocab_size, n_positions=256, n_embd=32, n_layer=2, n_head=2,
                        bos_token_id=fast.eos_token_id, eos_token_id=fast.eos_token_id)
    path = tmp_path_factory.mktemp("tiny-gpt2")
    GPT2LMHeadModel(config).save_pretrained(path)
    fast.save_pretrained(path)
    return path


def make_params(model_dir, **overrides) -> RewriteParams:
    return RewriteParams(backend="transformers", rewrites_per_caption=3, max_tokens=8,
                         transformers=TransformersBackendParams(model_dir=str(model_dir), batch_size=4), **overrides)


def step_input() -> pd.DataFrame:
    """The rewrite step's input for one shard: uid, caption and the entries balancing matched (the color)."""
    uids = [make_uid(f"http://x/{i}", c) for i, c in enumerate(CAPTIONS)]
    return pd.DataFrame({"uid": uids, "caption": CAPTIONS, "matched_entries": [[c.split()[1]] for c in CAPTIONS]})


def test_batched_generation_gives_k_sampled_rewrites_per_caption(model_dir):
    backend = LocalModelBackend(make_params(model_dir), seed=0)
    uids = [f"u{i}" for i in range(len(CAPTIONS))]
    entries = [[] for _ in CAPTIONS]
    first = backend.generate(uids, CAPTIONS, entries)
    assert len(first) == len(CAPTIONS)
    assert all(g.error is None and len(g.candidates) == 3 for g in first)
    assert all(isinstance(c, str) and "\n" not in c for g in first for c in g.candidates)
    assert len({c for g in first for c in g.candidates}) > 3  # sampled, not one greedy answer
    assert [g.candidates for g in backend.generate(uids, CAPTIONS, entries)] == [g.candidates for g in first]


def test_prompt_form_follows_the_tokenizer(model_dir):
    backend = LocalModelBackend(make_params(model_dir), seed=0)
    params = backend.params
    prompt = build_prompt("u1", CAPTIONS[0], params.instruction, params.examples, 3, seed=0)
    assert backend.prompt_text(prompt) == prompt.text()
    backend.tokenizer.chat_template = ("{% for m in messages %}<{{ m['role'] }}> {{ m['content'] }}\n{% endfor %}"
                                       "{% if add_generation_prompt %}<assistant>{% endif %}")
    chat = backend.prompt_text(prompt)
    assert (chat.startswith("<system> Rewrite")
            and chat.endswith(f"<user> <caption>{CAPTIONS[0]}</caption>\n<assistant>"))


def test_the_step_runs_the_local_model_and_the_guard_counts_add_up(model_dir):
    batch = step_input()
    params = make_params(model_dir)
    table = RewriteStep(params, StepContext(shards_dir=".")).apply(batch)
    summary = summarize(table, params, model_name(params))
    assert len(table) == len(CAPTIONS) and summary["model"] == str(model_dir)
    assert summary["slots"] == 3 * len(CAPTIONS)
    assert summary["kept"] + sum(summary["dropped"].values()) == summary["slots"]
    # Random weights rarely say the caption's color: the guard drops those rewrites as lost_entry.
    assert summary["dropped"].get("lost_entry", 0) > 0
    caption_of = batch.set_index("uid")["caption"]
    for uid, rewrites in zip(table["uid"], table["rewrites"]):
        assert all(caption_of[uid].split()[1] in r.split() for r in rewrites)


def test_a_missing_model_directory_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError, match="rewrite.transformers.model_dir: .* is not a saved model directory"):
        LocalModelBackend(make_params(tmp_path / "nowhere"), seed=0)
