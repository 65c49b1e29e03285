"""Concept sentences: parsing, documented errors, strategies and templates."""

from __future__ import annotations

import pytest

from mcpl.method.prompts import (
    TEMPLATES,
    Concept,
    SentenceError,
    check_against_vocab,
    parse_sentence,
    plan_prompts,
)

SENTENCE = "a photo of a brown <dog|dog|brown> on a rolling <skateboard|board>"


def test_parse_markers_initializers_and_adjectives():
    s = parse_sentence(SENTENCE)
    assert s.concepts == [Concept("dog", "dog", "brown"), Concept("skateboard", "board", None)]
    assert s.as_prompt() == "a photo of a brown <dog> on a rolling <skateboard>"
    assert parse_sentence("a <cat>").concepts == [Concept("cat", "cat", None)]


@pytest.mark.parametrize("text, message", [
    ("a photo of a dog", "no placeholder"),
    ("a photo of a <dog", "unbalanced '<'"),
    ("a photo of a dog> here <cat>", "unbalanced '>'"),
    ("a <dog <cat>>", "unbalanced '<'"),
    ("a <dog> and a <dog|puppy>", "duplicate placeholder"),
    ("a <dog|dog|fluffy> on grass", "adjective 'fluffy'"),
    ("a <> here", "invalid placeholder name"),
    ("a <do g> here", "invalid placeholder name"),
    ("a <dog|two words> here", "invalid initializer"),
    ("a <dog|dog|brown|x> brown", "4 fields"),
    ("   ", "empty sentence"),
])
def test_bad_sentences_raise_documented_errors(text, message):
    with pytest.raises(SentenceError, match=message):
        parse_sentence(text)


def test_placeholder_already_in_vocabulary_is_rejected():
    with pytest.raises(SentenceError, match="already in the tokenizer's vocabulary"):
        check_against_vocab([parse_sentence("a <dog>")], {"<dog>": 5})


def test_mcpl_one_learns_only_the_concepts():
    plan = plan_prompts([parse_sentence(SENTENCE)], "one")
    assert [t.token for t in plan.tokens] == ["<dog>", "<skateboard>"]
    assert [t.initializer for t in plan.tokens] == ["dog", "board"]
    assert plan.adjectives(0) == {"dog": "brown"}


def test_mcpl_all_learns_every_word_each_from_itself():
    plan = plan_prompts([parse_sentence(SENTENCE)], "all")
    words = [t.initializer for t in plan.tokens]
    assert words == ["a", "photo", "of", "a", "brown", "dog", "on", "a", "rolling", "board"]
    assert len({t.token for t in plan.tokens}) == len(plan.tokens)  # each occurrence its own token
    # the adjective became learnable: Bind adj points at its token
    assert plan.adjectives(0)["dog"].startswith("<w") and "brown" in plan.adjectives(0)["dog"]


def test_mcpl_diverse_shares_tokens_across_images():
    plan = plan_prompts([parse_sentence("a red <c1|object|red> near a <c2|thing>"),
                         parse_sentence("a <c2|thing> under a red <c1|object|red>")], "diverse")
    assert [t.token for t in plan.tokens] == ["<c1>", "<c2>"]
    assert "<c1>" in plan.prompt(1, "{}") and "<c2>" in plan.prompt(0, "{}")


def test_strategy_image_count_is_checked():
    s = parse_sentence(SENTENCE)
    with pytest.raises(SentenceError, match="at least two"):
        plan_prompts([s], "diverse")
    with pytest.raises(SentenceError, match="exactly one"):
        plan_prompts([s, s], "one")


def test_diverse_group_with_conflicting_initializers_is_rejected():
    with pytest.raises(SentenceError, match="different initializers"):
        plan_prompts([parse_sentence("a <c1|cat>"), parse_sentence("a <c1|dog>")], "diverse")


@pytest.mark.parametrize("strategy", ["one", "all"])
def test_templates_never_collide_or_duplicate(strategy):
    sentences = [SENTENCE, "a photo of a red <c1|object|red> and a photo <c2|thing>",
                 "a <x|object|good> good thing", "the <y> of the photo"]
    for text in sentences:
        plan = plan_prompts([parse_sentence(text)], strategy)
        forbidden = {t.initializer for t in plan.tokens if strategy == "all"} | {
            t.adjective for t in plan.tokens if t.adjective}
        for template in plan.templates:
            words = template.replace("{}", " ").split()
            assert not set(words) & forbidden, (text, template)
            prompt = plan.prompt(0, template).split()
            assert all(a != b for a, b in zip(prompt, prompt[1:], strict=False)), prompt
            assert not prompt[:6] == ["a", "photo", "of", "a", "photo", "of"]


def test_templates_exclude_adjective_words():
    plan = plan_prompts([parse_sentence("a bright <lamp|lamp|bright> on a desk")], "one")
    assert "a bright photo of {}" in TEMPLATES
    assert "a bright photo of {}" not in plan.templates
    assert "{}" in plan.templates


def test_leading_prefix_is_not_stacked_under_templates():
    plan = plan_prompts([parse_sentence(SENTENCE)], "one")
    assert plan.prompt(0, "a photo of {}") == "a photo of a brown <dog> on a rolling <skateboard>"


def test_multi_vector_tokens_follow_diffusers_convention():
    plan = plan_prompts([parse_sentence("a <dog>")], "one", num_vectors=3)
    assert plan.all_token_strings() == ["<dog>", "<dog>_1", "<dog>_2"]
    assert plan.prompt(0, "{}") == "a <dog> <dog>_1 <dog>_2"


def test_model_template_candidates_restrict_templates():
    plan = plan_prompts([parse_sentence(SENTENCE)], "one", templates=("{}", "a rendering of {}", "a brown {}"))
    assert plan.templates == ["{}", "a rendering of {}"]


def test_phrases_joined_by_and_can_be_listed_in_any_order():
    """PromptCL views may reorder phrases joined by 'and' / ',': the same scene, another prompt."""
    plan = plan_prompts([parse_sentence("a photo of a red <a|object|red> and a blue <b|object|blue>")], "one",
                        templates=("{}",))
    assert plan.orders == [[(0, 1), (1, 0)]]
    assert plan.prompt(0, "{}", 0) == "a red <a> and a blue <b>"
    assert plan.prompt(0, "{}", 1) == "a blue <b> and a red <a>"
    three = plan_prompts([parse_sentence("a <a|x>, a <b|y> and a <c|z>")], "one")
    assert len(three.orders[0]) == 6
    assert three.prompt(0, "{}", 5) == "a <c> , a <b> and a <a>"  # separators stay in place


def test_sentences_without_joined_phrases_have_one_order():
    assert plan_prompts([parse_sentence(SENTENCE)], "one").orders == [[(0,)]]  # "on" is no separator
    assert plan_prompts([parse_sentence("a <a|x> and")], "one").n_orders(0) == 1  # an empty phrase


# --------------------------------------------------------------------------- text hygiene
@pytest.mark.parametrize("text, fragment", [
    ("a <dog>\x00", "control character U+0000 NUL at character 7"),
    ("\x1b[31ma <dog>", "control character U+001B ESCAPE at character 0"),
    ("a\t<dog>", "U+0009 TAB"),
    ("a <dog>\n", "U+000A LINE FEED"),
    ("a \u202e<dog>", "invisible formatting character U+202E RIGHT-TO-LEFT OVERRIDE at character 2"),
    ("a\u200b <dog>", "U+200B ZERO WIDTH SPACE"),
    ("a <dog>\u2028", "line separator U+2028"),
    ("a <dog> \ud800", "lone surrogate U+D800"),
    ("a <dog> \ue000", "private-use character U+E000"),
])
def test_sentences_with_control_or_invisible_characters_are_refused(text, fragment):
    with pytest.raises(SentenceError, match="contains a") as err:
        parse_sentence(text)
    assert fragment in str(err.value)
    assert "\x00" not in str(err.value) and "\x1b" not in str(err.value)  # the message itself is safe to print


def test_long_sentences_are_refused_before_parsing():
    from mcpl.method.prompts import MAX_SENTENCE_CHARS

    parse_sentence("a <dog> " + "x" * (MAX_SENTENCE_CHARS - 8))
    with pytest.raises(SentenceError, match="characters long; the limit is 1,000"):
        parse_sentence("a <dog> " + "x" * MAX_SENTENCE_CHARS)


def test_words_of_any_script_stay_whole_and_are_read_composed():
    s = parse_sentence("a caf\u0065\u0301 <dog> on a s\u00e1nchez-style rug")
    assert s.words[:2] == ["a", "caf\u00e9"] and "s\u00e1nchez-style" in s.words
    assert parse_sentence("a (big) <dog>!").words == ["a", "(", "big", ")", "!"]  # ASCII splits as before


def test_visible_escapes_what_a_terminal_would_act_on():
    from mcpl.method.prompts import shown, visible

    assert visible("a\x1b[2Jb\u202ec\x07 d\xa0e") == "a\\x1b[2Jb\\u202ec\\x07 d\\xa0e"
    assert visible("x" * 10, limit=4) == "xxxx... (6 more characters)"
    assert shown("\x1b" + "y" * 100).startswith("'\\x1b") and "(101 characters)" in shown("\x1b" + "y" * 100)


def test_placeholders_that_differ_only_in_case_are_one_word_to_the_tokenizer():
    with pytest.raises(SentenceError, match="differ only in case"):
        parse_sentence("a <Dog> and a <dog>")
    with pytest.raises(SentenceError, match="differ only in case"):  # across a diverse group too
        plan_prompts([parse_sentence("a <Dog>"), parse_sentence("a <dog>")], "diverse")
    with pytest.raises(SentenceError, match="already in the tokenizer's vocabulary"):
        check_against_vocab([parse_sentence("a <Dog>")], {"<dog>": 5})
    with pytest.raises(SentenceError, match="at most 64"):
        parse_sentence(f"a <{'x' * 65}>")


def test_phrases_that_read_the_same_are_never_reordered():
    """Where only the place tells two words apart (same initializer, no adjective), reordering would teach
    both words both objects: no other order is offered, whatever the strategy."""
    from mcpl.method.prompts import parse_sentence, plan_prompts

    for strategy in ("one", "all"):
        assert plan_prompts([parse_sentence("a <a|object> and a <b|object>")], strategy).n_orders(0) == 1
    assert plan_prompts([parse_sentence("a <a|dog> and a <b|cat>")], "one").n_orders(0) == 2
    assert plan_prompts([parse_sentence("a red <a|object|red> and a blue <b|object|blue>")], "one").n_orders(0) == 2
    three = "a red <a|object|red>, a <b|object> and a <c|object>"
    assert plan_prompts([parse_sentence(three)], "one").n_orders(0) == 1
