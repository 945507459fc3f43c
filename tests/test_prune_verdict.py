"""The one EGP-vs-IMP verdict, on hand-made iteration rows."""

from egp_deploy.prune.verdict import compare_methods


def rows(accs, zero_h):
    return [{"iteration": i, "test_acc": a, "zero_entropy": z} for i, (a, z) in enumerate(zip(accs, zero_h))]


def test_judged_only_where_both_stay_within_the_tolerance():
    egp = rows([98.0, 97.5, 97.2, 90.0], [0, 1, 2, 9])
    imp = rows([98.0, 97.8, 97.0, 60.0], [0, 1, 0, 12])
    v = compare_methods(egp, imp, tolerance=1.0)
    assert v["iterations"] == [1, 2, 3] and v["zero_entropy_diff"] == [0, 2, -3]
    assert v["at_accuracy"]["iterations"] == [1, 2] and v["at_accuracy"]["zero_entropy_diff"] == [0, 2]
    assert v["holds"] is True  # the collapsed iteration 3 (IMP at 60 %) does not count
    assert v["egp_more_all_iterations"] is False and (v["wins"], v["ties"], v["losses"]) == (1, 1, 1)
    assert v["most_pruned_comparable"]["iteration"] == 2 and "HOLDS" in v["text"]


def test_not_decidable_without_a_comparable_iteration_and_other_key():
    egp = [{"iteration": 0, "test_acc": 90.0, "zl": 0}, {"iteration": 1, "test_acc": 50.0, "zl": 3}]
    imp = [{"iteration": 0, "test_acc": 90.0, "zl": 0}, {"iteration": 1, "test_acc": 89.5, "zl": 1}]
    v = compare_methods(egp, imp, tolerance=2.0, key="zl")
    assert v["holds"] is None and "not decidable" in v["text"]
    assert compare_methods(egp, imp, tolerance=50.0, key="zl")["holds"] is True
    assert compare_methods(imp, egp, tolerance=50.0, key="zl")["holds"] is False
