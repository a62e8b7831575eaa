"""Translation scores against values worked out by hand, in each convention the papers use."""
from __future__ import annotations

import math

import pytest

from fla_ds.evaluate import bleu_13a, bleu_signjoey, rouge_l, score
from fla_ds.evaluate.metrics import lcs_length


def cumulative_bleu(precisions, sys_len, ref_len):
    """The signjoey formula written out: BLEU-n = BP * exp(mean(log p_1..p_n)) x100, no smoothing."""
    bp = 1.0 if sys_len >= ref_len else math.exp(1 - ref_len / sys_len)
    out = {}
    for n in range(1, 5):
        ps = precisions[:n]
        out[f"bleu{n}"] = 0.0 if 0 in ps else 100 * bp * math.exp(sum(map(math.log, ps)) / n)
    return out


def assert_scores(got, expected):
    for key, value in expected.items():
        assert got[key] == pytest.approx(value, abs=1e-9), key


def test_bleu_with_a_brevity_penalty_and_no_4gram_match_matches_the_hand_count():
    hyps = ["the cat sat on the mat", "a dog runs"]
    refs = ["the cat is on the mat", "a dog runs fast"]
    # 1-grams: the x2, cat, on, mat match (sat does not) = 5/6; a, dog, runs = 3/3 -> p1 = 8/9
    # 2-grams: "the cat", "on the", "the mat" = 3/5; "a dog", "dog runs" = 2/2    -> p2 = 5/7
    # 3-grams: "on the mat" = 1/4; "a dog runs" = 1/1                           -> p3 = 2/5
    # 4-grams: none of "the cat sat on", "cat sat on the", "sat on the mat"    -> p4 = 0/3
    # hyp_len 9 < ref_len 10 -> BP = exp(1 - 10/9); BLEU-4 = 0 because nothing is smoothed.
    expected = cumulative_bleu([8 / 9, 5 / 7, 2 / 5, 0], sys_len=9, ref_len=10)
    got = bleu_signjoey(hyps, refs)
    assert_scores(got, expected)
    assert got["bleu1"] == pytest.approx(100 * math.exp(-1 / 9) * 8 / 9)
    assert got["bleu4"] == 0.0


def test_bleu_on_german_counts_umlauts_as_different_letters():
    hyps = ["Es wird heute regnen und kalt", "im Süden schön"]
    refs = ["es wird heute regnen und warm", "im süden schon"]
    # Lowercased, so "Es"/"es" and "Süden"/"süden" match; "schön" is not "schon".
    # 1-grams: 5/6 + 2/3 -> p1 = 7/9       2-grams: 4/5 + 1/2 ("im süden") -> p2 = 5/7
    # 3-grams: 3/4 + 0/1 -> p3 = 3/5       4-grams: 2/3 + none             -> p4 = 2/3
    # lengths 9 and 9 -> BP = 1
    expected = cumulative_bleu([7 / 9, 5 / 7, 3 / 5, 2 / 3], sys_len=9, ref_len=9)
    assert_scores(bleu_signjoey(hyps, refs), expected)
    assert expected["bleu4"] == pytest.approx(100 * (7 / 9 * 5 / 7 * 3 / 5 * 2 / 3) ** 0.25)


def test_umlauts_and_eszett_survive_every_step():
    assert bleu_signjoey(["schön"], ["schon"])["bleu1"] == 0.0
    assert rouge_l(["schön"], ["schon"]) == 0.0
    assert bleu_signjoey(["SCHÖN STRAẞE"], ["schön straße"])["bleu1"] == pytest.approx(100.0)
    assert score(["straße"], ["strasse"])["bleu1"] == 0.0
    # A decomposed ö (o + U+0308) is the same character as the composed one.
    assert score(["scho\u0308n"], ["sch\u00f6n"])["bleu1"] == pytest.approx(100.0)


def test_identical_corpora_score_100_everywhere():
    sents = ["am tag noch wolken", "im norden schnee möglich", "heute nacht zehn grad"]
    result = score(sents, sents)
    for key in ("bleu1", "bleu2", "bleu3", "bleu4", "rouge_l", "bleu_13a"):
        assert result[key] == pytest.approx(100.0), key
    assert result["n"] == 3


def test_lowercase_off_makes_case_count():
    assert bleu_signjoey(["Regen"], ["regen"], lowercase=False)["bleu1"] == 0.0
    assert bleu_signjoey(["Regen"], ["regen"])["bleu1"] == pytest.approx(100.0)


def test_lcs_length():
    assert lcs_length("abcbdab", "bdcaba") == 4
    assert lcs_length([], ["a"]) == 0
    assert lcs_length(["a", "b"], ["b", "a"]) == 1


def test_rouge_l_matches_the_hand_count_and_beta_weights_recall():
    # LCS("a b c d", "a c d e f") = "a c d" = 3 -> P = 3/4, R = 3/5
    p, r = 3 / 4, 3 / 5
    f12 = (1 + 1.44) * p * r / (r + 1.44 * p)  # = 1.098 / 1.68
    assert rouge_l(["a b c d"], ["a c d e f"]) == pytest.approx(100 * f12)
    assert f12 == pytest.approx(0.653571428)
    # beta = 1 is the plain harmonic mean; beta > 1 leans towards recall, which is the lower here.
    f1 = rouge_l(["a b c d"], ["a c d e f"], beta=1.0)
    assert f1 == pytest.approx(100 * 2 * p * r / (p + r))
    assert rouge_l(["a b c d"], ["a c d e f"]) < f1
    # Swapping the pair swaps P and R, and beta 1.2 then favours it.
    assert rouge_l(["a c d e f"], ["a b c d"]) > f1


def test_rouge_l_averages_sentences_and_scores_an_empty_hypothesis_0():
    # sentence 1: identical -> 1; sentence 2: P = 1, R = 2/4 -> 2.44 * 0.5 / (0.5 + 1.44) = 0.6289...
    second = 2.44 * 0.5 / (0.5 + 1.44)
    assert rouge_l(["x y z", "a b"], ["x y z", "a b c d"]) == pytest.approx(100 * (1 + second) / 2)
    assert rouge_l([""], ["a b"]) == 0.0
    assert rouge_l(["", "a b"], ["a b", "a b"]) == pytest.approx(50.0)
    assert rouge_l([""], [""]) == pytest.approx(100.0)


def test_rouge_l_keeps_chinese_that_rouge_score_would_drop():
    # LCS("今天 好", "今天 很 好") = 2 -> P = 1, R = 2/3
    assert rouge_l(["今天 好"], ["今天 很 好"]) == pytest.approx(100 * 2.44 * (2 / 3) / (2 / 3 + 1.44))


def test_chinese_is_scored_per_character():
    hyp, ref = "今天天气好", "今天 天气 很 好"  # spaces in the reference are not characters
    # characters: hyp 今天天气好 (5), ref 今天天气很好 (6)
    # 1-grams 5/5; 2-grams 今天 天天 天气 match, 气好 not = 3/4; 3-grams 今天天 天天气 = 2/3;
    # 4-grams 今天天气 = 1/2; BP = exp(1 - 6/5)
    expected = cumulative_bleu([1, 3 / 4, 2 / 3, 1 / 2], sys_len=5, ref_len=6)
    assert_scores(bleu_signjoey([hyp], [ref], level="char"), expected)
    # LCS = 5 -> P = 1, R = 5/6
    rouge = 100 * 2.44 * (5 / 6) / (5 / 6 + 1.44)
    assert rouge_l([hyp], [ref], level="char") == pytest.approx(rouge)
    result = score([hyp], [ref], level="char")
    assert_scores(result, {**expected, "rouge_l": rouge})
    assert "|tok:zh|" in result["bleu_13a_signature"] and "level=char" in result["convention"]
    # At word level the unsegmented hypothesis is one token that matches nothing.
    assert score([hyp], [ref])["bleu1"] == 0.0


def test_phoenix_period_adds_a_matched_token_and_is_recorded():
    hyps, refs = ["regen und schnee"], ["regen und schnee im norden"]
    plain = score(hyps, refs)
    dotted = score(hyps, refs, phoenix_period=True)
    # plain: 3/3 unigrams, BP = exp(1 - 5/3);  with " .": 4/4 unigrams, BP = exp(1 - 6/4)
    assert plain["bleu1"] == pytest.approx(100 * math.exp(1 - 5 / 3))
    assert dotted["bleu1"] == pytest.approx(100 * math.exp(1 - 6 / 4))
    # LCS 3 of 3/5 -> 4 of 4/6 ("." is a token that matches)
    assert plain["rouge_l"] == pytest.approx(100 * 2.44 * 0.6 / (0.6 + 1.44))
    assert dotted["rouge_l"] == pytest.approx(100 * 2.44 * (4 / 6) / (4 / 6 + 1.44))
    assert "phoenix trailing ' .': no" in plain["convention"]
    assert "phoenix trailing ' .': yes" in dotted["convention"]


def test_13a_splits_punctuation_that_the_signjoey_convention_keeps_on_the_word():
    hyps, refs = ["guten morgen, wie geht es dir."], ["guten morgen , wie geht es dir ."]
    # tokenize=none: "morgen," and "dir." are tokens of their own, unlike "morgen" "," "dir" "."
    #   1-grams guten wie geht es = 4/6; 2-grams "wie geht" "geht es" = 2/5;
    #   3-grams "wie geht es" = 1/4; 4-grams 0/3; hyp_len 6 < ref_len 8
    expected = cumulative_bleu([4 / 6, 2 / 5, 1 / 4, 0], sys_len=6, ref_len=8)
    assert_scores(bleu_signjoey(hyps, refs), expected)
    # 13a detaches the punctuation, so the hypothesis becomes the reference: 100
    value, signature = bleu_13a(hyps, refs)
    assert value == pytest.approx(100.0)
    assert signature.startswith("nrefs:1|") and "|tok:13a|" in signature and "|smooth:exp|" in signature


def test_bleu_13a_uses_sacrebleu_defaults_and_case_follows_the_flag():
    hyps, refs = ["Guten Morgen wie geht es"], ["guten morgen wie geht es"]
    value, signature = bleu_13a(hyps, refs)
    assert value < 100.0 and "|case:mixed|" in signature
    result = score(hyps, refs)
    assert result["bleu_13a"] == pytest.approx(100.0)
    assert result["bleu_13a_signature"].startswith("nrefs:1|case:lc|")
    assert result["bleu_13a_signature"] in result["convention"]


def test_score_returns_every_figure_and_states_the_convention():
    result = score(["a b c d"], ["a b c e"])
    assert set(result) == {
        "bleu1", "bleu2", "bleu3", "bleu4", "rouge_l", "bleu_13a", "bleu_13a_signature", "n", "convention",
    }
    conv = result["convention"]
    for part in ("signjoey", "lowercased", "whitespace tokens", "no smoothing", "tokenize=none",
                 "beta=1.2", "level=word", "nrefs:1|"):
        assert part in conv, part


def test_misaligned_or_empty_input_is_refused():
    with pytest.raises(ValueError, match="3 hypotheses but 2 references"):
        score(["a", "b", "c"], ["a", "b"])
    for fn in (bleu_signjoey, rouge_l, bleu_13a):
        with pytest.raises(ValueError, match="1 hypotheses but 2 references"):
            fn(["a"], ["a", "b"])
    with pytest.raises(ValueError, match="no sentences"):
        score([], [])
    with pytest.raises(TypeError, match="reference 0 is bytes"):
        score(["a"], [b"a"])
    with pytest.raises(ValueError, match="level"):
        score(["a"], ["a"], level="bpe")


def test_one_counting_pass_equals_scoring_each_order_alone():
    import random

    from sacrebleu.metrics import BLEU

    rng = random.Random(0)
    words = "wetter regen sonne wind schnee nord süd heute morgen".split()
    refs = [" ".join(rng.choices(words, k=rng.randint(1, 9))) for _ in range(40)]
    hyps = [" ".join(rng.choices(words, k=rng.randint(0, 9))) for _ in range(40)]
    got = bleu_signjoey(hyps, refs)
    for n in range(1, 5):
        alone = BLEU(tokenize="none", smooth_method="none", max_ngram_order=n).corpus_score(hyps, [refs])
        assert got[f"bleu{n}"] == pytest.approx(alone.score, abs=1e-9)
