"""QA scoring functions (exact match, token F1, ROUGE-L) on known cases."""

from orchestrator.reports.scores import exact_match, normalize, rouge_l, token_f1


def test_normalize_and_exact_match():
    assert normalize("The  Rhododendron, Arboreum!") == "rhododendron arboreum"
    assert exact_match("the Rhododendron arboreum.", "Rhododendron Arboreum") == 1.0
    assert exact_match("Rhododendron", "Rhododendron Arboreum") == 0.0


def test_token_f1_and_rouge_l():
    assert token_f1("national flower of Nepal", "the national flower") == 2 * (2 / 4) * (2 / 2) / (2 / 4 + 1)
    assert token_f1("", "x") == 0.0
    assert rouge_l("a b c d", "a b c d") == 1.0
    # LCS of "x b y d" and "b c d" is "b d": P = 2/4, R = 2/3
    assert abs(rouge_l("x b y d", "b c d") - 2 * (0.5 * 2 / 3) / (0.5 + 2 / 3)) < 1e-9
    assert rouge_l("q", "r") == 0.0
