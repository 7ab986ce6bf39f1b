"""Language step: captions with a part confidently in another language are dropped, two-word fragments and
non-Latin scripts included; short or ambiguous English, file names, numbers, entities and upper case are kept; the
models ship inside the py3langid and wordfreq wheels."""
from __future__ import annotations

import pandas as pd
import pytest

from clipmill.components.common.errors import ConfigError
from clipmill.components.common.steps import StepContext, check_output
from clipmill.components.filter.langid import (
    FOREIGN_REASON,
    IDENTIFIER_LANGUAGES,
    LangIdStep,
    caption_parts,
    language_text,
    script_odds,
    word_odds,
)
from clipmill.components.filter.params import FilterParams

CONTEXT = StepContext(shards_dir=".")

FOREIGN = {  # caption -> the language its foreign part is identified as
    "写真: a red circle on a blue background": "ja",
    "a green star in the middle (zdjęcie)": "pl",
    "그림: two yellow hearts": "ko",
    "télécharger gratuitement: an orange diamond": "fr",
    "un cercle rouge sur un fond bleu avec une étoile jaune": "fr",
    "ein rotes Quadrat und ein blauer Kreis auf weißem Hintergrund": "de",
    "a red car (fondos de pantalla)": "es",          # two-word fragments: py3langid alone is flat on these
    "gratis downloaden: a city at night": "nl",
    "壁纸: a cozy cabin in the woods": "zh",            # a script English is not written in
}
ENGLISH = [
    "a blue star",                       # short: the model's probabilities are flat, so it stays undecided
    "a purple box pattern",
    "a golden wedge",
    "DSC41414.JPG",                      # no linguistic content
    "a pink circle - flat design icon",
    "Drawing: An Orange Diamond And Two Blue Dots",
    "",
    "two emerald hearts on a noisy background, vector illustration",
    "IMG_0042.JPG A LARGE YELLOW HEART IN THE CENTER",
    "&quot;a salmon circle &amp; a purple triangle&quot; - royalty free | click to enlarge",
    "cute kawaii clipart png aesthetic printable",
    "Tokyo 東京 skyline at dusk",
    "Mexican food: tacos, burritos, enchiladas and salsa",
    "ＦＲＥＥ 𝐯𝐞𝐜𝐭𝐨𝐫 𝐢𝐜𝐨𝐧 of a star",     # full-width and bold letters are Latin ones
]


def run(captions: list[str], **params) -> pd.DataFrame:
    batch = pd.DataFrame({"uid": [f"u{i}" for i in range(len(captions))], "caption": captions})
    step = LangIdStep(FilterParams(**params), CONTEXT)
    return check_output(LangIdStep, step.apply(batch), batch, [])


def test_foreign_fragments_and_foreign_captions_are_dropped_with_their_language():
    out = run(list(FOREIGN))
    assert out["reason"].tolist() == [f"{FOREIGN_REASON}:{lang}" for lang in FOREIGN.values()]


def test_short_and_ambiguous_english_file_names_and_empty_captions_are_kept():
    out = run(ENGLISH)
    assert out["keep"].all(), out[~out["keep"]]


def test_kept_languages_are_configurable_and_an_empty_list_switches_the_step_off():
    german = "ein rotes Quadrat und ein blauer Kreis auf weißem Hintergrund"
    assert run([german], languages=["en", "de"])["keep"].all()
    assert not run([german], languages=["en"])["keep"].any()
    assert run(list(FOREIGN), languages=[])["keep"].all()


def test_higher_odds_keep_the_less_confident_fragments():
    loose, strict = run(list(FOREIGN), language_min_odds=2.0), run(list(FOREIGN), language_min_odds=1e12)
    assert (~loose["keep"]).sum() > (~strict["keep"]).sum()


def test_unknown_language_codes_are_config_errors_before_any_work():
    with pytest.raises(ConfigError, match=r"filter.languages: \['english'\]"):
        LangIdStep.check_params(FilterParams(languages=["en", "english"]), CONTEXT)
    LangIdStep.check_params(FilterParams(languages=["en", "de"]), CONTEXT)


def test_the_languages_checked_without_the_model_are_the_models_own():
    from clipmill.components.filter.langid import identifier

    assert IDENTIFIER_LANGUAGES == frozenset(identifier().labels)


def test_captions_are_cut_into_parts_at_punctuation_and_dashes_but_not_hyphens():
    assert caption_parts("写真: a brown-colored ring (photo de) - HD | big") == \
        ["写真", "a brown-colored ring", "photo de", "HD", "big"]


def test_expectations_accept_named_foreign_languages_and_fail_a_kept_or_missing_one():
    import great_expectations as gx

    params = FilterParams()
    table = run(list(FOREIGN) + ENGLISH)
    bad = pd.concat([table, pd.DataFrame({"uid": ["x", "y"], "keep": [False, False],
                                          "reason": [f"{FOREIGN_REASON}:en", FOREIGN_REASON]})], ignore_index=True)
    context = gx.get_context(mode="ephemeral")
    batches = context.data_sources.add_pandas("t").add_dataframe_asset("a").add_batch_definition_whole_dataframe("w")
    results = {}
    for name, frame in [("good", table), ("bad", bad), ("empty", table[table["keep"]])]:
        [(_, checked, expectations)] = LangIdStep.expectations(params, frame, ".")
        suite = gx.ExpectationSuite(name=name, expectations=expectations)
        result = batches.get_batch(batch_parameters={"dataframe": checked}).validate(suite)
        results[name] = (result.success, result.results[0].result.get("unexpected_count"))
    assert results == {"good": (True, 0), "bad": (False, 2), "empty": (True, 0)}


def test_file_names_numbers_and_entities_are_no_language_evidence():
    assert language_text("IMG_0042.jpg &quot;A RED Circle&quot; 4k download (7).png") == '"a red circle" download'


def test_the_word_and_script_evidence_needs_a_word_list_for_every_kept_language():
    english, afrikaans = frozenset({"en"}), frozenset({"en", "af"})  # wordfreq has no Afrikaans list
    assert word_odds("foto van", english)[0] == "nl" and word_odds("foto van", english)[1] > 2
    assert word_odds("foto van", afrikaans) == ("", 0.0)
    assert script_odds("фото", english)[1] == float("inf") and script_odds("фото", afrikaans) == ("", 0.0)
    assert script_odds("фото", frozenset({"en", "bg"})) == ("", 0.0)  # Cyrillic is kept


def test_prepare_loads_the_models_as_the_steps_start_up_and_nothing_when_the_step_is_off():
    from clipmill.components.filter import langid

    for cached in (langid.kept_scripts, langid.word_lists):
        cached.cache_clear()
    LangIdStep(FilterParams(languages=[]), CONTEXT).prepare()
    assert langid.word_lists.cache_info().currsize == 0
    LangIdStep(FilterParams(languages=["en"]), CONTEXT).prepare()
    assert langid.word_lists.cache_info().currsize == 1 and langid.kept_scripts.cache_info().currsize == 1
    assert run(["写真: a red circle"])["reason"].tolist() == [f"{FOREIGN_REASON}:ja"]
