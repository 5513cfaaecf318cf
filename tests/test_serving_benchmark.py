"""`benchmarks/serving.py --quick`: the serving benchmark runs end to end on the tiny preset (continuous scheduler
and static batches; transformers is left out) and every request gets exactly its token budget."""

import pytest


@pytest.mark.slow
def test_serving_benchmark_quick_runs(capsys):
    from benchmarks import serving

    results = serving.main(["--quick"])
    assert [r["name"] for r in results] == ["continuous (Scheduler)", "static batches (Engine.generate)"]
    for r in results:  # summarize() already raised if a request got a different number of tokens
        assert r["tokens/s"] > 0 and len(r["ttft"]) == 6 and all(t >= 0 for t in r["ttft"])
    assert "| continuous (Scheduler) |" in capsys.readouterr().out
