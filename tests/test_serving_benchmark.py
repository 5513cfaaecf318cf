"""`benchmarks/serving.py --quick`: the serving benchmark runs end to end on the tiny preset (continuous scheduler
and static batches; transformers is left out) and every request gets exactly its token budget."""

import pytest


@pytest.mark.slow
def test_serving_benchmark_quick_runs(capsys):
    from benchmarks import serving

    results = serving.main(["--quick"])
    assert [r["name"] for r in results][:2] == ["continuous (Scheduler)", "static batches (Engine.generate)"]
    bound = results[2]
    assert bound["name"].startswith("bound") and bound["tokens/s"] > 0
    assert bound["prefill_s_per_token"] > 0 and bound["decode_s_per_token"] > 0
    for r in results[:2]:  # summarize() already raised if a request got a different number of tokens
        assert r["tokens/s"] > 0 and len(r["ttft"]) == 6 and all(t >= 0 for t in r["ttft"])
    out = capsys.readouterr().out
    assert "| continuous (Scheduler) |" in out and "| bound: ideal scheduler" in out and "ratios to static" in out
